"""Gated MLPs (SwiGLU / GeGLU) that keep one activation-sized tensor less for backward.

``down(act(gate(x)) * up(x))`` traced by autograd keeps ``gate(x)`` (for act's backward), ``act(gate(x))`` and
``up(x)`` (for the product's backward) and the product (down's input): four (tokens × intermediate) tensors
per layer, the largest activations of a decoder block. :class:`ActMul` keeps only ``gate(x)`` and ``up(x)``
and recomputes ``act(gate(x))`` in backward, one cheap elementwise op. The math is unchanged: forward is the
same expression and backward is autograd's own over the recomputed activation.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from lorafit.train.compiled import compiled

# MLP classes whose forward is exactly ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` in transformers.
GATED_MLP_CLASSES = {
    "LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GemmaMLP", "Gemma2MLP", "Gemma3MLP",
    "OlmoMLP", "Olmo2MLP", "GraniteMLP", "SmolLM3MLP", "CohereMLP",
}


def _silu_mul(g, u):
    return torch.nn.functional.silu(g) * u


def _silu_mul_backward(g, u, grad):
    # silu'(g) = σ(g)·(1 + g·(1 − σ(g))), as torch's silu_backward computes it. Compiled only: eager, the fp32
    # temporaries would outweigh the saving, and autograd's silu_backward is used instead.
    sig = torch.sigmoid(g.float())
    grad_u = (grad.float() * (g.float() * sig)).to(u.dtype)
    grad_g = (grad.float() * u.float() * sig * (1 + g.float() * (1 - sig))).to(g.dtype)
    return grad_g, grad_u


_silu_mul_c = compiled(_silu_mul)
_silu_mul_backward_c = compiled(_silu_mul_backward)


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


class ActMul(torch.autograd.Function):
    """``act(g) * u`` saving ``g`` and ``u`` only; SiLU (most models) runs as one compiled kernel each way."""

    @staticmethod
    def forward(ctx, g, u, act):
        ctx.act = act
        ctx.save_for_backward(g, u)
        return _silu_mul_c(g, u) if _is_silu(act) else act(g) * u  # eager _silu_mul is the same expression

    @staticmethod
    def backward(ctx, grad):
        g, u = ctx.saved_tensors
        if _is_silu(ctx.act) and _silu_mul_backward_c.usable:  # fused; eager, autograd's own backward below
            grad_g, grad_u = _silu_mul_backward_c(g, u, grad.contiguous())
            return (grad_g if ctx.needs_input_grad[0] else None), (grad_u if ctx.needs_input_grad[1] else None), None
        with torch.enable_grad():
            g_ = g.detach().requires_grad_(ctx.needs_input_grad[0])
            a = ctx.act(g_)
        grad_u = grad * a.detach() if ctx.needs_input_grad[1] else None
        grad_g = torch.autograd.grad(a, g_, grad * u)[0] if ctx.needs_input_grad[0] else None
        return grad_g, grad_u, None


def _lean_forward(self, x):
    return self.down_proj(ActMul.apply(self.gate_proj(x), self.up_proj(x), self.act_fn))


def use_lean_gated_mlps(model: nn.Module) -> int:
    """Switch every known gated MLP of ``model`` to :class:`ActMul` (in place); returns how many."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in GATED_MLP_CLASSES and all(
            hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")
        ):
            module.forward = types.MethodType(_lean_forward, module)
            count += 1
    return count
