"""Rotary position embedding (RoPE) as one fused kernel each way.

transformers applies RoPE to queries and keys as ``q·cos + rotate_half(q)·sin``: in eager PyTorch that is a
slice, a negation, a concatenation, two multiplies and an add per tensor, each its own pass over memory, and
as many again in backward (about 0.1 s of a 3 s step of a 135M model on two CPU cores). :class:`RotaryFunction`
computes the same expression in one compiled kernel (``lorafit.train.compiled``) and its exact gradient in
another: the rotation's transpose is ``rotate_half_t(v) = cat(v₂, −v₁)``, so
``dq = g·cos + rotate_half_t(g·sin)``. It saves only ``cos`` and ``sin``, which autograd keeps too.

The modelling modules call a module-level ``apply_rotary_pos_emb``; :func:`use_lean_rotary` replaces it in
the modules whose function is exactly Llama's (checked on the source). The replacement is the same math and
hands anything it does not train through (no gradient wanted, e.g. generation) to the original function.
"""

from __future__ import annotations

import inspect
import sys

import torch
from torch import nn

from lorafit.train.compiled import compiled


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate_half_t(x):  # transpose of rotate_half: its gradient
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], -x[..., :half]), dim=-1)


def _forward(q, k, cos, sin):
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _backward(gq, gk, cos, sin):
    return gq * cos + _rotate_half_t(gq * sin), gk * cos + _rotate_half_t(gk * sin)


_forward_c = compiled(_forward)
_backward_c = compiled(_backward)


class RotaryFunction(torch.autograd.Function):
    """``(q·cos + rotate_half(q)·sin, k·cos + rotate_half(k)·sin)`` for ``cos``/``sin`` broadcastable to q, k."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _forward_c(q, k, cos, sin)

    @staticmethod
    def backward(ctx, gq, gk):
        cos, sin = ctx.saved_tensors
        dq, dk = _backward_c(gq, gk, cos, sin)
        return dq, dk, None, None


def _make_lean(original):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)) or cos.requires_grad or sin.requires_grad:
            return original(q, k, cos, sin, unsqueeze_dim)
        return RotaryFunction.apply(q, k, cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim))

    apply_rotary_pos_emb.lorafit_original = original
    return apply_rotary_pos_emb


def _is_llama_rope(fn) -> bool:
    from transformers.models.llama import modeling_llama

    reference = getattr(modeling_llama.apply_rotary_pos_emb, "lorafit_original", modeling_llama.apply_rotary_pos_emb)
    if fn is reference:
        return True
    try:
        return inspect.getsource(fn) == inspect.getsource(reference)
    except (OSError, TypeError):
        return False


def use_lean_rotary(model: nn.Module) -> int:
    """Switch the ``apply_rotary_pos_emb`` of the modelling modules used by ``model`` to :class:`RotaryFunction`
    where it is Llama's; returns how many modules were switched (each at most once per process)."""
    count = 0
    for name in {type(m).__module__ for m in model.modules()}:
        module = sys.modules.get(name)
        fn = getattr(module, "apply_rotary_pos_emb", None)
        if fn is None or hasattr(fn, "lorafit_original") or not _is_llama_rope(fn):
            continue
        module.apply_rotary_pos_emb = _make_lean(fn)
        count += 1
    return count
