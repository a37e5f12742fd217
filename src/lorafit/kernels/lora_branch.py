"""The LoRA branch as pure tensor math, and the autograd function that makes a LoRA layer lean.

Math (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"; identical to PEFT)::

    y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ        A: (r × in), B: (out × r), s = alpha / r   (rsLoRA: alpha / √r)

Why a hand-written autograd function: letting autograd trace ``W x + s·B(A(dropout(x)))`` keeps, per
wrapped layer, a dropout mask and a dropped-out *copy* of ``x`` for ``dA``. With seven targets per decoder
block that is seven extra activation-sized tensors per layer, more than the frozen model itself needs.
:class:`LoraLinearFunction` saves only:

* ``x`` itself, by reference — so q/k/v (and gate/up), which all read the same normed hidden state, share
  one saved tensor (the frozen base matmul needs no saved input at all: ``dx = g W`` needs only ``W``);
* ``x Aᵀ`` (tokens × r), tiny;
* for dropout, a seed: the mask is a hash of it and the element index, recomputed in backward inside the
  kernel that applies it (:mod:`lorafit.kernels.dropout`), not a mask plus a dropped-out copy.

:func:`branch_forward` and :func:`branch_backward` are shared by every kernel that contains a LoRA layer
(this module's function, the shared-input group, the fused gated MLP); they know nothing of modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorafit.kernels import dropout, matmul
from lorafit.options import RuntimeOptions


@dataclass(frozen=True)
class Branch:
    """One LoRA layer's operands. ``weight`` (out × in) and ``bias`` are the base's; ``lora_a``/``lora_b`` may be
    fp32 master weights under a bf16 base (cast to the matmuls' dtype; gradients come back in their own)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float
    dropout_p: float = 0.0


@dataclass
class Saved:
    """What forward keeps for backward besides the input: ``x·Aᵀ`` (N × r) and the dropout seed (or None)."""

    xa: torch.Tensor
    seed: torch.Tensor | None


@dataclass(frozen=True)
class Needs:
    """Which gradients backward must produce."""

    x: bool
    weight: bool
    bias: bool
    lora_a: bool
    lora_b: bool


@dataclass
class Grads:
    """Gradients of one branch (None where not needed). ``x`` may be whatever a ``fused_input`` returned."""

    x: object = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None


def compute_dtype_for(options: RuntimeOptions, x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """fp32 for a frozen bf16 base on a CPU whose bf16 GEMMs are slow (see :mod:`lorafit.options`), else x's."""
    rows = x.numel() // max(x.shape[-1], 1)
    return x.dtype if weight.requires_grad else matmul.compute_dtype(options, x.dtype, x.device, rows)


def branch_forward(x2: torch.Tensor, br: Branch, compute_dtype: torch.dtype, hashed: bool,
                   dropped: list | None = None) -> tuple[torch.Tensor, Saved]:
    """``(y, saved)`` for 2-D ``x2``. The matmuls run in ``compute_dtype`` (copies where it differs) and ``y`` is
    rounded once back to ``x2``'s dtype. ``hashed``: dropout seeds for the hashed mask (compiled kernels on).
    ``dropped``: ``[drop(x2), seed]`` when the caller made them together with ``x2`` (the gated MLP, the group);
    emptied here, so the copy is freed as soon as A has read it."""
    out_dtype = x2.dtype
    weight, bias = br.weight, br.bias
    if compute_dtype != weight.dtype:  # x2 may already be a copy (the group)
        x2, weight, bias = matmul.to_compute(compute_dtype, x2, weight, bias)
    a = br.lora_a.to(x2.dtype)
    b = br.lora_b.to(x2.dtype)
    seed = None
    p = br.dropout_p
    if p > 0:
        if dropped is None:
            seed = dropout.new_seed(x2.device, hashed)
            xd = dropout.dropped(x2, seed=seed, p=p)
        else:
            xd, seed = dropped[0].to(x2.dtype), dropped[1]
            dropped.clear()
        xa = (xd @ a.t()).mul_(1.0 / (1.0 - p))  # (N, r)
        del xd
    else:
        xa = x2 @ a.t()
    # in place: out-of-place addmm would first copy the (N × out) base result into a new tensor
    y = F.linear(x2, weight, bias).addmm_(xa, b.t(), alpha=br.scaling)
    return y.to(out_dtype), Saved(xa, seed)


def branch_grads(g, lora_b, xa, scaling: float, dropout_p: float, dropout_on: bool, need_b: bool):
    """``(g_xa, dB)`` for the 2-D output gradient ``g`` (in the matmuls' dtype): the gradient reaching
    ``drop(x)·Aᵀ``, with dropout's ``1/(1-p)`` folded in while it is small (N × r), and B's gradient in B's dtype
    (None unless ``need_b``)."""
    g_xa = (g @ lora_b.to(g.dtype)).mul_(scaling / (1.0 - dropout_p) if dropout_on else scaling)
    # (xaᵀ g)ᵀ, not gᵀ xa: the GEMM reads g row-major (135M shape: 0.48 vs 0.65 ms for 1536 outputs)
    grad_b = (xa.t() @ g).t().mul_(scaling).to(lora_b.dtype) if need_b else None
    return g_xa, grad_b


def branch_backward(g: torch.Tensor, br: Branch, saved: Saved, needs: Needs, compute_dtype: torch.dtype,
                    x2: torch.Tensor | None = None, input_fn: Callable[[], torch.Tensor] | None = None,
                    fused_input: Callable | None = None) -> Grads:
    """Gradients of :func:`branch_forward` for the 2-D output gradient ``g``.

    The input is ``x2``, or ``input_fn()`` for a caller that recomputes it (called only if ``dA`` or ``dW`` needs
    it). x's, the weight's and the bias's gradients come back in ``g``'s dtype, A's and B's in their own.
    ``fused_input(base, low, seed) -> (drop(x2), grad)``: for a caller that recomputes ``x2`` from tensors it
    keeps (the gated MLP) and goes on from x's gradient in the same pass. That gradient is ``base + low · keep``
    (``seed`` a hashed int32 seed) or, without dropout, ``base`` itself (``low``, ``seed`` None). Used when x's
    and A's gradients are both needed and the weight is frozen; whatever ``grad`` it returns is ``Grads.x``.
    """
    out_dtype = g.dtype
    get_input = input_fn if x2 is None else (lambda: x2)
    weight = br.weight
    if compute_dtype != out_dtype:
        g, weight = matmul.to_compute(compute_dtype, g, weight)
        raw_input = get_input
        get_input = lambda: raw_input().to(compute_dtype)  # noqa: E731 - copied only if used
    fused = fused_input is not None and needs.x and needs.lora_a and not needs.weight
    x = get_input() if (needs.lora_a or needs.weight) and not fused else None
    a = br.lora_a.to(g.dtype)
    seed, p = saved.seed, br.dropout_p

    g_xa, grad_b = branch_grads(g, br.lora_b, saved.xa, br.scaling, p, seed is not None, needs.lora_b)
    grads = Grads(lora_b=grad_b)
    xd = x  # the input A saw
    if fused:
        base = g @ weight
        if seed is None:
            xd, grads.x = fused_input(base.addmm_(g_xa, a), None, None)
        else:
            xd, grads.x = fused_input(base, g_xa @ a, seed)
    elif seed is None:
        if needs.x:
            grads.x = (g @ weight).addmm_(g_xa, a).to(out_dtype)
    elif needs.x and needs.lora_a:  # one pass over the mask for both
        xd, grads.x = dropout.dropped_and_add_dropped(x, g @ weight, g_xa @ a, seed=seed, p=p)
        grads.x = grads.x.to(out_dtype)
    elif needs.x:
        grads.x = dropout.add_dropped(g @ weight, g_xa @ a, seed=seed, p=p).to(out_dtype)
    elif needs.lora_a:
        xd = dropout.dropped(x, seed=seed, p=p)
    if needs.lora_a:
        grads.lora_a = (g_xa.t() @ xd).to(br.lora_a.dtype)
    if needs.weight:
        grads.weight = (g.t() @ x).to(out_dtype)
    if needs.bias:
        grads.bias = g.sum(0).to(out_dtype)
    return grads


class LoraLinearFunction(torch.autograd.Function):
    """``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ`` with a minimal set of saved tensors (see the module docstring).

    ``weight`` is (out × in) in ``x``'s dtype. Dropout multiplies x by a 0/1 mask and applies its ``1/(1-p)`` to
    the small (N × r) product instead of the (N × in) input. ``options``: the run's :class:`RuntimeOptions`.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, dropout_p: float, options: RuntimeOptions):
        br = Branch(weight, bias, lora_a, lora_b, scaling, dropout_p)
        ctx.compute_dtype = compute_dtype_for(options, x, weight)
        y, saved = branch_forward(x.reshape(-1, x.shape[-1]), br, ctx.compute_dtype, hashed=options.compile)
        ctx.save_for_backward(x, weight, lora_a, lora_b, saved.xa, saved.seed)
        ctx.scaling, ctx.dropout_p = scaling, dropout_p
        ctx.has_bias = bias is not None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_a, lora_b, xa, seed = ctx.saved_tensors
        n = ctx.needs_input_grad
        needs = Needs(x=n[0], weight=n[1], bias=n[2] and ctx.has_bias, lora_a=n[3], lora_b=n[4])
        br = Branch(weight, None, lora_a, lora_b, ctx.scaling, ctx.dropout_p)
        grads = branch_backward(grad_out.reshape(-1, grad_out.shape[-1]), br, Saved(xa, seed), needs,
                                ctx.compute_dtype, x2=x.reshape(-1, x.shape[-1]))
        grad_x = grads.x.view(x.shape) if grads.x is not None else None
        return grad_x, grads.weight, grads.bias, grads.lora_a, grads.lora_b, None, None, None
