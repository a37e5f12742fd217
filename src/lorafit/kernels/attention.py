"""Causal self-attention of a bf16/fp16 model on fp32 copies, where the CPU's half-precision kernels are slow.

Same reason and rule as the frozen matmuls (:mod:`lorafit.options`): on a CPU without AMX, PyTorch's flash
attention is slower in bf16 than in fp32 (135M shape, 4 × 256 tokens, 2 threads: ~28 ms vs ~20 ms per layer
forward + backward, copies included). :class:`HalfAttentionOnFp32` runs the same CPU flash-attention kernels
SDPA dispatches to, on fp32 copies of q, k, v made right before the kernel and freed right after, and rounds
the output once. It saves what SDPA's own backward saves — q, k, v and the output in the model's dtype, and
the fp32 log-sum-exp — so saved memory is unchanged.

Which calls it takes over is :mod:`lorafit.patches.attention`'s business.
"""

from __future__ import annotations

import torch

from lorafit._compat import CPU_FLASH_ATTENTION, CPU_FLASH_ATTENTION_BACKWARD


class HalfAttentionOnFp32(torch.autograd.Function):
    """Causal ``softmax(q kᵀ · scale) v`` for (batch, heads, tokens, head_dim) inputs; k, v may have fewer heads
    (grouped-query attention). Computed in fp32, returned and saved in the inputs' dtype."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float | None):
        out, lse = CPU_FLASH_ATTENTION(q.float(), k.float(), v.float(), 0.0, True, scale=scale)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = CPU_FLASH_ATTENTION_BACKWARD(grad.float(), q.float(), k.float(), v.float(), out.float(), lse,
                                                  0.0, True, scale=ctx.scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None
