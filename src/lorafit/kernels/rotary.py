"""Rotary position embedding (RoPE) as one fused kernel each way.

transformers applies RoPE to queries and keys as ``q·cos + rotate_half(q)·sin``: in eager PyTorch that is a
negation, a concatenation, two multiplies and an add per tensor, each its own pass over memory, and as many
again in backward (about 0.8 ms per layer of a 135M model's step on two CPU cores). :class:`RotaryFunction`
computes the same expression in one compiled kernel (:mod:`lorafit.kernels.compiled`) and its exact gradient in
another: ``rotate_half(v) = cat(−v₂, v₁)`` is a skew rotation, its transpose is its negative, so
``dq = g·cos − rotate_half(g·sin)``. It saves only ``cos`` and ``sin``, which autograd keeps too. In fp32 the
results equal transformers' (bit for bit on the CPU it was checked on); in bf16 the kernel rounds once
instead of after every op.

Which models use it is :mod:`lorafit.patches.rotary`'s business.
"""

from __future__ import annotations

import torch

from lorafit.kernels.compiled import compiled


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _forward(q, k, cos, sin):
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _backward(g, cos, sin):
    return g * cos - _rotate_half(g * sin)  # rotate_half is a skew rotation: its transpose is its negative


_forward_c = compiled(_forward)
_backward_c = compiled(_backward)


class RotaryFunction(torch.autograd.Function):
    """``(q·cos + rotate_half(q)·sin, k·cos + rotate_half(k)·sin)`` for ``cos``/``sin`` broadcastable to q, k."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, compile: bool):
        ctx.save_for_backward(cos, sin)
        ctx.compile = compile
        q_out, k_out = _forward_c(q, k, cos, sin, compile=compile)
        # An output of a frozen input (k of layer 0 when k_proj is not adapted) must not make attention's backward
        # compute a gradient nobody uses.
        ctx.mark_non_differentiable(*(out for out, inp in ((q_out, q), (k_out, k)) if not inp.requires_grad))
        return q_out, k_out

    @staticmethod
    def backward(ctx, gq, gk):
        cos, sin = ctx.saved_tensors
        need_q, need_k = ctx.needs_input_grad[:2]
        dq = _backward_c(gq, cos, sin, compile=ctx.compile) if need_q else None
        dk = _backward_c(gk, cos, sin, compile=ctx.compile) if need_k else None
        return dq, dk, None, None, None
