"""Gated MLPs (SwiGLU / GeGLU) that keep one activation-sized tensor less for backward.

``down(act(gate(x)) * up(x))`` traced by autograd keeps ``gate(x)`` (for act's backward), ``act(gate(x))`` and
``up(x)`` (for the product's backward) and the product (down's input): four (tokens × intermediate) tensors
per layer, the largest activations of a decoder block. :class:`ActMul` keeps only ``gate(x)`` and ``up(x)``
and recomputes ``act(gate(x))`` in backward, one cheap elementwise op. The math is unchanged: forward is the
same expression and backward is autograd's own over the recomputed activation.

When ``down_proj`` is a LoRA layer over a frozen base, the product itself need not be kept either: its only
use in backward is LoRA's ``dA``, so :class:`ActMulLoraDown` recomputes it there from ``gate(x)`` and ``up(x)``
(one fused elementwise kernel) — one more (tokens × intermediate) tensor less per layer.

Which MLP modules run these functions is :mod:`lorafit.patches.gated_mlp`'s business.
"""

from __future__ import annotations

import torch
from torch import nn

from lorafit.kernels import dropout as lora_dropout
from lorafit.kernels import nf4
from lorafit.kernels.compiled import compiled
from lorafit.kernels.lora_branch import (
    Branch,
    Needs,
    Saved,
    branch_backward,
    branch_forward,
    compute_dtype_for,
)
from lorafit.options import RuntimeOptions


def _silu_mul(g, u):
    return torch.nn.functional.silu(g) * u


def _silu_mul_backward(g, u, grad):
    # silu'(g) = σ(g)·(1 + g·(1 − σ(g))), as torch's silu_backward computes it. Compiled only: eager, the fp32
    # temporaries would outweigh the saving, and autograd's silu_backward is used instead.
    sig = torch.sigmoid(g.float())
    grad_u = (grad.float() * (g.float() * sig)).to(u.dtype)
    grad_g = (grad.float() * u.float() * sig * (1 + g.float() * (1 - sig))).to(g.dtype)
    return grad_g, grad_u


def _silu_mul_dropped(g, u, seed, p: float):
    """``(h, h · keep)`` for ``h = silu(g) · u`` (2-D): down_proj's input and LoRA's dropped-out copy, one pass."""
    h = _silu_mul(g, u)
    return h, h * lora_dropout.keep_mask(seed, h.shape, p, h.dtype)


def _down_input_backward(g, u, base, low, seed, p: float):
    """Backward through down_proj's input ``h = silu(g) · u`` (2-D) in one pass, h's gradient being
    ``base + low · keep`` (``base`` without dropout): ``(drop(h), grad g, grad u)``, ``drop(h)`` in ``base``'s dtype
    for LoRA's dA. Replaces three passes (recompute h; apply the mask; SiLU-product backward)."""
    h = _silu_mul(g, u).to(base.dtype)
    if seed is None:
        return (h, *_silu_mul_backward(g, u, base))
    keep = lora_dropout.keep_mask(seed, base.shape, p, base.dtype)
    return (h * keep, *_silu_mul_backward(g, u, base + low * keep))


_silu_mul_c = compiled(_silu_mul)
_silu_mul_backward_c = compiled(_silu_mul_backward)
_silu_mul_dropped_c = compiled(_silu_mul_dropped)
_down_input_backward_c = compiled(_down_input_backward)


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def act_mul(g, u, act, compile: bool):
    # eager _silu_mul is the same expression
    return _silu_mul_c(g, u, compile=compile) if _is_silu(act) else act(g) * u


def act_mul_backward(g, u, act, grad, need_g: bool, need_u: bool, compile: bool):
    """Gradients of ``act(g) * u`` for ``grad``; SiLU runs as one compiled kernel, else autograd's own."""
    if _is_silu(act) and _silu_mul_backward_c.usable(compile):
        grad_g, grad_u = _silu_mul_backward_c(g, u, grad.contiguous(), compile=True)
        return (grad_g if need_g else None), (grad_u if need_u else None)
    with torch.enable_grad():
        g_ = g.detach().requires_grad_(need_g)
        a = act(g_)
    grad_u = grad * a.detach() if need_u else None
    grad_g = torch.autograd.grad(a, g_, grad * u)[0] if need_g else None
    return grad_g, grad_u


class ActMul(torch.autograd.Function):
    """``act(g) * u`` saving ``g`` and ``u`` only; SiLU (most models) runs as one compiled kernel each way."""

    @staticmethod
    def forward(ctx, g, u, act, compile: bool):
        ctx.act, ctx.compile = act, compile
        ctx.save_for_backward(g, u)
        return act_mul(g, u, act, compile)

    @staticmethod
    def backward(ctx, grad):
        g, u = ctx.saved_tensors
        return *act_mul_backward(g, u, ctx.act, grad, *ctx.needs_input_grad[:2], ctx.compile), None, None


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class ActMulLoraDown(torch.autograd.Function):
    """``down(act(g) * u)`` for a LoRA ``down_proj`` (frozen base), saving ``g`` and ``u`` but not the product.

    Same math as ``ActMul`` followed by ``LoraLinearFunction``: the product is recomputed in backward, only
    when LoRA's ``dA`` is needed, from the tensors ``ActMul`` keeps anyway. With SiLU and compiled kernels the
    elementwise work around down_proj is fused: forward makes the product and its dropped-out copy in one pass,
    backward recomputes it, applies the mask and runs the product's backward in one more (memory traffic, not
    arithmetic, is what these passes cost).
    """

    @staticmethod
    def forward(ctx, g, u, act, weight, bias, lora_a, lora_b, scaling: float, dropout_p: float,
                options: RuntimeOptions):
        # a 4-bit weight (QLoRA) is dequantized here and again in backward; only the packed one is kept
        br = Branch(nf4.dense(weight, g.dtype), bias, lora_a, lora_b, scaling, dropout_p)
        ctx.compute_dtype = compute_dtype_for(options, g, weight)  # fp32 where bf16 GEMMs are slow
        ctx.compile = compile = options.compile
        dropped = None
        if dropout_p > 0 and _is_silu(act) and compile:  # hashed masks: the product and its masked copy in one pass
            seed = lora_dropout.new_seed(g.device, hashed=True)
            h, hd = _silu_mul_dropped_c.kernel(_flat(g), _flat(u), seed, dropout_p)
            dropped = [hd, seed]  # branch_forward frees hd once A has read it
            del hd
        else:
            h = _flat(act_mul(g, u, act, compile))
        y, saved = branch_forward(h, br, ctx.compute_dtype, compile, dropped)
        del br
        ctx.save_for_backward(g, u, weight, lora_a, lora_b, saved.xa, saved.seed)
        ctx.act, ctx.scaling, ctx.dropout_p, ctx.has_bias = act, scaling, dropout_p, bias is not None
        return y.view(*g.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        g, u, weight, lora_a, lora_b, xa, seed = ctx.saved_tensors
        need_g, need_u, _, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:7]
        fused_input = None
        if _is_silu(ctx.act) and ctx.compile and (seed is None or seed.dtype == torch.int32):
            def fused_input(base, low, s):
                hd, grad_g, grad_u = _down_input_backward_c.kernel(_flat(g), _flat(u), base, low, s, ctx.dropout_p)
                return hd, (grad_g, grad_u)
        dense = nf4.dense(weight, g.dtype) if need_g or need_u or need_w else None
        br = Branch(dense, None, lora_a, lora_b, ctx.scaling, ctx.dropout_p)
        needs = Needs(x=need_g or need_u, weight=need_w, bias=need_bias and ctx.has_bias, lora_a=need_a, lora_b=need_b)
        grads = branch_backward(_flat(grad), br, Saved(xa, seed), needs, ctx.compute_dtype,
                                input_fn=lambda: _flat(act_mul(g, u, ctx.act, ctx.compile)), fused_input=fused_input)
        grad_g = grad_u = None
        if isinstance(grads.x, tuple):  # the fused kernel went on to the product's backward
            grad_g = grads.x[0].view(g.shape) if need_g else None
            grad_u = grads.x[1].view(u.shape) if need_u else None
        elif grads.x is not None:
            grad_g, grad_u = act_mul_backward(g, u, ctx.act, grads.x.view(g.shape), need_g, need_u, ctx.compile)
        return grad_g, grad_u, None, grads.weight, grads.bias, grads.lora_a, grads.lora_b, None, None, None
