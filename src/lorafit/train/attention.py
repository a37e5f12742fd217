"""Causal self-attention of a bf16/fp16 model on fp32 copies, where the CPU's half-precision kernels are slow.

Same reason and rule as :mod:`lorafit.matmul`: on a CPU without AMX, PyTorch's flash attention is slower in
bf16 than in fp32 (135M shape, 4 × 256 tokens, 2 threads: ~28 ms vs ~20 ms per layer forward + backward,
copies included). :class:`HalfAttentionOnFp32` runs the same CPU flash-attention kernels SDPA dispatches to, on
fp32 copies of q, k, v made right before the kernel and freed right after, and rounds the output once. It saves
what SDPA's own backward saves — q, k, v and the output in the model's dtype, and the fp32 log-sum-exp —
so saved memory is unchanged.

transformers' ``"sdpa"`` attention function is wrapped process-wide (:func:`use_lean_attention`); the wrapper
takes over only the plain case (causal, no mask, no dropout, no position bias, equal query and key lengths, on
a CPU where :func:`lorafit.matmul.upcasts` says so; there is no weight to copy, so no minimum size) and hands
everything else to transformers unchanged.
"""

from __future__ import annotations

import torch

from lorafit import matmul

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
_SWITCHED: list = []  # (mapping, original) pairs, for restore_attention()


class HalfAttentionOnFp32(torch.autograd.Function):
    """Causal ``softmax(q kᵀ · scale) v`` for (batch, heads, tokens, head_dim) inputs; k, v may have fewer heads
    (grouped-query attention). Computed in fp32, returned and saved in the inputs' dtype."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float | None):
        out, lse = _FLASH(q.float(), k.float(), v.float(), 0.0, True, scale=scale)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _FLASH_BACKWARD(grad.float(), q.float(), k.float(), v.float(), out.float(), lse, 0.0, True,
                                     scale=ctx.scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def _takes_over(module, query, key, value, attention_mask, dropout, kwargs) -> bool:
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    return (is_causal is True and attention_mask is None and not dropout and query.device.type == "cpu"
            and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
            and not kwargs.get("output_attentions") and query.shape[2] == key.shape[2] > 1
            and query.shape[-1] == key.shape[-1] == value.shape[-1] and query.shape[1] % key.shape[1] == 0
            and query.dtype == key.dtype == value.dtype and matmul.upcasts(query.dtype, query.device))


def _make_lean(original):
    def sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if not _takes_over(module, query, key, value, attention_mask, dropout, kwargs):
            return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        out = HalfAttentionOnFp32.apply(query, key, value, scaling)
        return out.transpose(1, 2).contiguous(), None  # (batch, tokens, heads, head_dim), as transformers returns

    sdpa_attention_forward.lorafit_original = original
    return sdpa_attention_forward


def use_lean_attention() -> bool:
    """Wrap transformers' ``"sdpa"`` attention function (process-wide, once); whether it was switched now."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    mapping = ALL_ATTENTION_FUNCTIONS._global_mapping
    original = mapping.get("sdpa")
    if original is None or hasattr(original, "lorafit_original"):
        return False
    mapping["sdpa"] = _make_lean(original)
    _SWITCHED.append((mapping, original))
    return True


def restore_attention() -> int:
    """Put transformers' own ``"sdpa"`` function back where :func:`use_lean_attention` wrapped it."""
    count = len(_SWITCHED)
    while _SWITCHED:
        mapping, original = _SWITCHED.pop()
        mapping["sdpa"] = original
    return count
