"""Rotary position embedding (RoPE) as one fused kernel each way.

transformers applies RoPE to queries and keys as ``q·cos + rotate_half(q)·sin``: in eager PyTorch that is a
negation, a concatenation, two multiplies and an add per tensor, each its own pass over memory, and as many
again in backward (about 0.8 ms per layer of a 135M model's step on two CPU cores). :class:`RotaryFunction`
computes the same expression in one compiled kernel (``lorafit.train.compiled``) and its exact gradient in
another: ``rotate_half(v) = cat(−v₂, v₁)`` is a skew rotation, its transpose is its negative, so
``dq = g·cos − rotate_half(g·sin)``. It saves only ``cos`` and ``sin``, which autograd keeps too. In fp32 the
results equal transformers' (bit for bit on the CPU it was checked on); in bf16 the kernel rounds once
instead of after every op.

The modelling modules call a module-level ``apply_rotary_pos_emb``; :func:`use_lean_rotary` replaces it in the
modules whose function and ``rotate_half`` are exactly Llama's (checked on the source). The switch is
process-wide; the replacement is the same math and hands anything it does not train through (no gradient
wanted, e.g. generation) to the original function. :func:`restore_rotary` undoes it.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from lorafit.train.compiled import compiled
from lorafit.train.rms_norm import same_source

_SWITCHED: list = []  # the modelling modules whose apply_rotary_pos_emb use_lean_rotary replaced


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
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        q_out, k_out = _forward_c(q, k, cos, sin)
        # An output of a frozen input (k of layer 0 when k_proj is not adapted) must not make attention's backward
        # compute a gradient nobody uses.
        ctx.mark_non_differentiable(*(out for out, inp in ((q_out, q), (k_out, k)) if not inp.requires_grad))
        return q_out, k_out

    @staticmethod
    def backward(ctx, gq, gk):
        cos, sin = ctx.saved_tensors
        need_q, need_k = ctx.needs_input_grad[:2]
        dq = _backward_c(gq, cos, sin) if need_q else None
        dk = _backward_c(gk, cos, sin) if need_k else None
        return dq, dk, None, None


def _make_lean(original):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        trained = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        if not trained or cos.requires_grad or sin.requires_grad:
            return original(q, k, cos, sin, unsqueeze_dim)
        return RotaryFunction.apply(q, k, cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim))

    apply_rotary_pos_emb.lorafit_original = original
    return apply_rotary_pos_emb


def _is_llama_rope(module) -> bool:
    """Whether ``module``'s ``apply_rotary_pos_emb`` and the ``rotate_half`` it calls are exactly Llama's."""
    from transformers.models.llama import modeling_llama as llama

    reference = getattr(llama.apply_rotary_pos_emb, "lorafit_original", llama.apply_rotary_pos_emb)
    return same_source(module.apply_rotary_pos_emb, reference) and same_source(
        getattr(module, "rotate_half", None), llama.rotate_half)


def use_lean_rotary(model: nn.Module) -> int:
    """Switch the ``apply_rotary_pos_emb`` of the modelling modules used by ``model`` to :class:`RotaryFunction`
    where it is Llama's; returns how many modules were switched (each at most once per process)."""
    count = 0
    for name in {type(m).__module__ for m in model.modules()}:
        module = sys.modules.get(name)
        fn = getattr(module, "apply_rotary_pos_emb", None)
        if fn is None or hasattr(fn, "lorafit_original") or not _is_llama_rope(module):
            continue
        module.apply_rotary_pos_emb = _make_lean(fn)
        _SWITCHED.append(module)
        count += 1
    return count


def restore_rotary() -> int:
    """Put transformers' own ``apply_rotary_pos_emb`` back wherever :func:`use_lean_rotary` switched it."""
    count = len(_SWITCHED)
    while _SWITCHED:
        module = _SWITCHED.pop()
        module.apply_rotary_pos_emb = module.apply_rotary_pos_emb.lorafit_original
    return count
