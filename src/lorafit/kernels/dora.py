"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation") as tensor math: PEFT's ``use_dora``.

Math (PEFT's ``DoraLinearLayer``, term for term)::

    n = ‖W + s · B A‖ per output row, detached      (paper §4.3: the norm gets no gradient)
    f = m / n                                      m: the trained magnitude vector (out)
    y = x Wᵀ + b + (f − 1) ⊙ x' Wᵀ + f ⊙ s · x' Aᵀ Bᵀ      x' = drop(x) in training with dropout, else x

Without dropout that is ``b + f ⊙ (x Wᵀ + s · x Aᵀ Bᵀ)``: DoRA's ``m · (W + sBA) / ‖W + sBA‖`` applied to
x. With dropout PEFT keeps the base term on the undropped x and rescales the dropped one, so forward and
backward run the frozen matmul twice (as PEFT does).

:class:`DoraLinearFunction` saves, besides x by reference and the parameters: ``x'·Aᵀ`` (N × r), ``z = x' Wᵀ +
s · x' Aᵀ Bᵀ`` (N × out: m's gradient is ``Σₙ g ⊙ z / n``), the norm n (out, fp32) and a dropout seed. PEFT's
autograd keeps two (N × out) tensors and, with dropout, the dropped-out copy of x and its mask. The norm is
computed in row chunks: neither B A nor an in × in identity (PEFT's way to form B A) is materialised whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorafit.kernels import dropout, matmul
from lorafit.kernels.lora_branch import Branch, branch_grads, compute_dtype_for
from lorafit.options import RuntimeOptions

# Elements of one chunk of W + s·BA while its row norms are computed (16 MiB in fp32).
NORM_CHUNK_ELEMENTS = 2**22


@torch.no_grad()
def row_norms(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``‖W + s · B A‖`` per output row in fp32 (``weight`` out × in), a few rows at a time."""
    a, b = lora_a.float(), lora_b.float()
    rows = max(1, NORM_CHUNK_ELEMENTS // weight.shape[1])
    parts = []
    for i in range(0, weight.shape[0], rows):
        w = (b[i:i + rows] @ a).mul_(scaling).add_(weight[i:i + rows])  # PEFT's order: W + s · (B A)
        parts.append(torch.linalg.vector_norm(w, dim=1))
    return torch.cat(parts)


def merged_weight(weight: torch.Tensor, delta: torch.Tensor,
                  magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f · (W + ΔW), n)`` in fp32 for ``delta`` = s·BA (out × in): PEFT's merged weight and the norm it used."""
    w = weight.float() + delta
    norm = torch.linalg.vector_norm(w, dim=1)
    return (magnitude.float() / norm).view(-1, 1) * w, norm


def dora_forward(x2: torch.Tensor, br: Branch, f: torch.Tensor, compute_dtype: torch.dtype,
                 hashed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(y, z, x'·Aᵀ, seed)`` for 2-D ``x2`` and the fp32 factor ``f = m / n``; y in ``x2``'s dtype, the rest in
    ``compute_dtype`` (see the module docstring)."""
    out_dtype = x2.dtype
    weight, bias = br.weight, br.bias
    if compute_dtype != weight.dtype:
        x2, weight, bias = matmul.to_compute(compute_dtype, x2, weight, bias)
    a, b = br.lora_a.to(compute_dtype), br.lora_b.to(compute_dtype)
    p, seed = br.dropout_p, None
    y = F.linear(x2, weight, bias)  # PEFT's ``result``: the base layer on the undropped x
    if p > 0:
        seed = dropout.new_seed(x2.device, hashed)
        xd = dropout.dropped(x2, seed=seed, p=p)  # x · keep; the 1/(1-p) goes on the products
        z = F.linear(xd, weight).mul_(1.0 / (1.0 - p))
        xa = (xd @ a.t()).mul_(1.0 / (1.0 - p))
        del xd
    else:
        z = y - bias if bias is not None else y.clone()  # PEFT: base_result = result - bias
        xa = x2 @ a.t()
    lr = xa @ b.t()
    # PEFT's order of operations, so that fp32 results agree to the bit: y + ((f-1)·z + (f·lr)·s). f - 1 is
    # taken in fp32: in bf16, f ≈ 1 would lose the small rescaling entirely.
    t = z * (f - 1).to(z.dtype)
    z.add_(lr, alpha=br.scaling)  # what backward keeps for m's gradient
    t.add_(lr.mul_(f.to(lr.dtype)).mul_(br.scaling))
    del lr
    y.add_(t)
    return y.to(out_dtype), z, xa, seed


class DoraLinearFunction(torch.autograd.Function):
    """A DoRA layer's output (module docstring) for ``weight`` (out × in, ``x``'s dtype; frozen in DoRA training,
    a gradient for it anyway if it is trained) and ``norm`` = :func:`row_norms` (no gradient); gradients for x,
    the bias, A, B and the magnitude."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, magnitude, norm, scaling: float, dropout_p: float,
                options: RuntimeOptions):
        ctx.compute_dtype = compute_dtype_for(options, x, weight)
        br = Branch(weight, bias, lora_a, lora_b, scaling, dropout_p)
        f = magnitude.detach().float() / norm
        y, z, xa, seed = dora_forward(x.reshape(-1, x.shape[-1]), br, f, ctx.compute_dtype, options.compile)
        ctx.save_for_backward(x, weight, lora_a, lora_b, magnitude, norm, z, xa, seed)
        ctx.scaling, ctx.dropout_p, ctx.has_bias = scaling, dropout_p, bias is not None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_a, lora_b, magnitude, norm, z, xa, seed = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b, need_m = ctx.needs_input_grad[:6]
        cd, s, p = ctx.compute_dtype, ctx.scaling, ctx.dropout_p
        g, w = matmul.to_compute(cd, grad_out.reshape(-1, grad_out.shape[-1]), weight)
        f = magnitude.detach().float() / norm
        grad_m = (g * z).sum(0, dtype=torch.float32).div_(norm).to(magnitude.dtype) if need_m else None
        grad_bias = g.sum(0).to(grad_out.dtype) if need_bias and ctx.has_bias else None
        gf = g * f.to(cd)  # the gradient reaching x'Wᵀ + s·x'AᵀBᵀ through f
        g_xa, grad_b = branch_grads(gf, lora_b, xa, s, p, seed is not None, need_b)
        a = lora_a.to(cd)
        x2 = x.reshape(-1, x.shape[-1]).to(cd) if need_a or need_w else None  # the input, for dA and dW
        grad_x, grad_w, xd = None, None, x2
        if seed is None:
            if need_x:
                grad_x = (gf @ w).addmm_(g_xa, a)
            if need_w:  # a trained base (not DoRA's use): through x Wᵀ, the norm being detached
                grad_w = gf.t() @ x2
        else:
            # the undropped base term's gradient, plus the dropped terms' (masked: they saw x · keep / (1-p))
            g_low = g * (f - 1).to(cd)
            low = (g_low @ w).mul_(1.0 / (1.0 - p)).addmm_(g_xa, a)
            if need_x and (need_a or need_w):
                xd, grad_x = dropout.dropped_and_add_dropped(x2, g @ w, low, seed=seed, p=p)
            elif need_x:
                grad_x = dropout.add_dropped(g @ w, low, seed=seed, p=p)
            elif need_a or need_w:
                xd = dropout.dropped(x2, seed=seed, p=p)
            if need_w:
                grad_w = (g.t() @ x2).add_(g_low.t() @ xd, alpha=1.0 / (1.0 - p))
        grad_a = (g_xa.t() @ xd).to(lora_a.dtype) if need_a else None
        if grad_x is not None:
            grad_x = grad_x.to(grad_out.dtype).view(x.shape)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, grad_m, None, None, None, None
