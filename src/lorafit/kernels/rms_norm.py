"""RMSNorm with a hand-written backward: keeps the input by reference and one fp32 scale per token.

transformers' ``LlamaRMSNorm`` (and the identical Mistral/Qwen/Phi-3/... norms) traced by autograd keeps the
fp32 upcast of its input (4 B per element, a second copy under bf16) and runs seven elementwise passes each
way. :class:`RMSNormFunction` computes the same expression::

    y = weight * (x_fp32 * rsqrt(mean(x_fp32²) + eps)).to(x.dtype)

saving only ``x`` and ``rstd`` (4 B per token); both directions are single compiled kernels
(:mod:`lorafit.kernels.compiled`). Which norms are switched to it is :mod:`lorafit.patches`' business.
"""

from __future__ import annotations

import torch

from lorafit.kernels.compiled import compiled


def _forward(x, weight, eps: float):
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (xf * rstd).to(x.dtype), rstd


def _backward(x, weight, rstd, grad, need_weight: bool):
    xf = x.float()
    n = xf * rstd
    gn = (grad * weight).float()  # weight * n.to(dtype): the product's gradient w.r.t. n, in the compute dtype
    # d/dx of x·rstd(x): rstd·gn − rstd³·x·mean(gn·x)
    gx = (rstd * gn - (rstd * rstd * rstd) * xf * (gn * xf).mean(-1, keepdim=True)).to(x.dtype)
    gw = (grad.float() * n.to(x.dtype).float()).reshape(-1, x.shape[-1]).sum(0) if need_weight else None
    return gx, gw


_forward_c = compiled(_forward)
_backward_c = compiled(_backward)


class RMSNormFunction(torch.autograd.Function):
    """``weight * normalize(x)`` as Llama's RMSNorm computes it; ``compile``: run the compiled kernels."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, compile: bool):
        y, rstd = _forward_c(x, weight, eps, compile=compile)
        ctx.save_for_backward(x, weight, rstd)
        ctx.compile = compile
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        gx, gw = _backward_c(x, weight, rstd, grad.contiguous(), need_w, compile=ctx.compile)
        return (gx if need_x else None), (gw.to(weight.dtype) if need_w else None), None, None
