"""The LoRA linear layer and the autograd function that makes it lean.

Math (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"; identical to PEFT)::

    h = W x + b + s · B A dropout(x)        A: (r × in), B: (out × r), s = alpha / r   (rsLoRA: alpha / √r)

``A`` starts kaiming-uniform with a = √5 (what ``nn.Linear`` uses, and PEFT), ``B`` starts at zero, so a fresh
adapter leaves the model unchanged. Merging adds ``s · B A`` to ``W``; unmerging subtracts it.

Why a hand-written autograd function: letting autograd trace ``W x + s·B(A(dropout(x)))`` keeps, per
wrapped layer, a dropout mask and a dropped-out *copy* of ``x`` for ``dA``. With seven targets per decoder
block that is seven extra activation-sized tensors per layer, more than the frozen model itself needs.
``LoraLinearFunction`` saves only:

* ``x`` itself, by reference — so q/k/v (and gate/up), which all read the same normed hidden state, share
  one saved tensor (the frozen base matmul needs no saved input at all: ``dx = g W`` needs only ``W``);
* ``x Aᵀ`` (tokens × r), tiny;
* for dropout, a seed: the mask is a hash of it and the element index, recomputed in backward inside the
  kernel that applies it (``lora.dropout``), not a mask plus a dropped-out copy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lorafit import matmul
from lorafit.lora import dropout as lora_dropout

try:  # GPT-2 style layers: weight stored as (in, out), y = x W + b.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()

WRAPPABLE = (nn.Linear, Conv1D)


def to_compute(dtype: torch.dtype, *tensors):
    """``tensors`` (None kept) in the matmuls' ``dtype``: fp32 copies of bf16 ones where lorafit.matmul says so."""
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def lora_forward(x2, weight, bias, lora_a, lora_b, scaling: float, dropout_p: float, compute_dtype=None,
                 dropped=None):
    """``x2 Wᵀ + b + s · (drop(x2) Aᵀ) Bᵀ`` for 2-D ``x2``; returns ``(y, xa, dropout seed or None)``, what
    :func:`lora_backward` needs besides ``x2`` and the weights. ``compute_dtype`` (see :func:`compute_dtype_for`):
    the matmuls run on copies in it, and ``y`` is rounded once back to ``x2``'s dtype. ``dropped``: a list
    ``[drop(x2), seed]`` when the caller made them together with ``x2`` (``train.gated_mlp``, ``lora.group``);
    it is emptied here."""
    out_dtype = x2.dtype
    if compute_dtype is not None and compute_dtype != weight.dtype:  # x2 may already be a copy (lora.group)
        x2, weight, bias = to_compute(compute_dtype, x2, weight, bias)
    a = lora_a.to(x2.dtype)
    b = lora_b.to(x2.dtype)
    seed = None
    if dropout_p > 0:
        if dropped is None:
            seed = lora_dropout.new_seed(x2.device)
            xd = lora_dropout.dropped(x2, seed=seed, p=dropout_p)
        else:  # the caller's [drop(x2), seed]; emptied, so the copy is freed as soon as A has read it
            xd, seed = dropped[0].to(x2.dtype), dropped[1]
            dropped.clear()
        xa = (xd @ a.t()).mul_(1.0 / (1.0 - dropout_p))  # (N, r)
        del xd
    else:
        xa = x2 @ a.t()
    # in place: out-of-place addmm would first copy the (N × out) base result into a new tensor
    y = F.linear(x2, weight, bias).addmm_(xa, b.t(), alpha=scaling)
    return y.to(out_dtype), xa, seed


def lora_backward(g, x2, weight, lora_a, lora_b, xa, seed, scaling: float, dropout_p: float, needs,
                  compute_dtype=None, fused_input=None):
    """Gradients ``(x, weight, bias, A, B)`` of :func:`lora_forward` for the 2-D output gradient ``g``.

    ``needs``: the five ``needs_input_grad`` flags. ``x2`` may be a callable returning the input: it is then
    called only if ``dA`` (the only user of the input when the base is frozen) is needed. ``compute_dtype``: as
    in :func:`lora_forward`; the gradients of x, weight and bias come back in ``g``'s dtype, A's and B's in
    their own. ``fused_input(base, low, seed) -> (drop(x2), grad)``: for a caller that recomputes ``x2`` from
    tensors it keeps (``train.gated_mlp``) and goes on from x's gradient in the same pass. That gradient is
    ``base + low · keep`` (``seed`` a hashed int32 seed: the caller passes ``fused_input`` only then) or, without
    dropout, ``base`` itself (``low``, ``seed`` None). Used when x's and A's gradients are both needed and the
    weight is frozen; whatever ``grad`` it returns (the gated MLP: gate's and up's gradients) is returned in
    place of x's.
    """
    out_dtype = g.dtype
    if compute_dtype is not None and compute_dtype != out_dtype:
        g, weight = to_compute(compute_dtype, g, weight)
        x_in = x2
        x2 = lambda: (x_in() if callable(x_in) else x_in).to(compute_dtype)  # noqa: E731 - copied only if used
    need_x, need_w, need_bias, need_a, need_b = needs
    p = dropout_p
    a = lora_a.to(g.dtype)
    fused = fused_input is not None and need_x and need_a and not need_w
    if callable(x2) and (need_a or need_w) and not fused:
        x2 = x2()

    g_xa, grad_b = branch_grads(g, lora_b, xa, scaling, dropout_p, seed is not None, need_b)
    grad_a = grad_x = grad_w = grad_bias = None
    xd = x2  # the input A saw
    if fused:
        base = g @ weight
        if seed is None:
            xd, grad_x = fused_input(base.addmm_(g_xa, a), None, None)
        else:
            xd, grad_x = fused_input(base, g_xa @ a, seed)
    elif seed is None:
        if need_x:
            grad_x = (g @ weight).addmm_(g_xa, a)
    elif need_x and need_a:  # one pass over the mask for both
        xd, grad_x = lora_dropout.dropped_and_add_dropped(x2, g @ weight, g_xa @ a, seed=seed, p=p)
    elif need_x:
        grad_x = lora_dropout.add_dropped(g @ weight, g_xa @ a, seed=seed, p=p)
    elif need_a:
        xd = lora_dropout.dropped(x2, seed=seed, p=p)
    if need_a:
        grad_a = (g_xa.t() @ xd).to(lora_a.dtype)
    if need_w:
        grad_w = g.t() @ x2
    if need_bias:
        grad_bias = g.sum(0)
    grad_w, grad_bias = (None if t is None else t.to(out_dtype) for t in (grad_w, grad_bias))
    if grad_x is not None and not fused:
        grad_x = grad_x.to(out_dtype)
    return grad_x, grad_w, grad_bias, grad_a, grad_b


def branch_grads(g, lora_b, xa, scaling: float, dropout_p: float, dropout: bool, need_b: bool):
    """``(g_xa, dB)`` of the LoRA branch for the 2-D output gradient ``g`` (in the matmuls' dtype): the gradient
    reaching ``drop(x)·Aᵀ``, with dropout's ``1/(1-p)`` folded in while it is small (N × r), and B's gradient in
    B's dtype (None unless ``need_b``)."""
    g_xa = (g @ lora_b.to(g.dtype)).mul_(scaling / (1.0 - dropout_p) if dropout else scaling)
    # (xaᵀ g)ᵀ, not gᵀ xa: the GEMM reads g row-major (135M shape: 0.48 vs 0.65 ms for 1536 outputs)
    grad_b = (xa.t() @ g).t().mul_(scaling).to(lora_b.dtype) if need_b else None
    return g_xa, grad_b


class LoraLinearFunction(torch.autograd.Function):
    """``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ`` with a minimal set of saved tensors (see module docstring).

    ``weight`` is (out × in) in ``x``'s dtype; ``lora_a``/``lora_b`` may be fp32 master weights: they are cast
    to the matmuls' dtype (``x``'s, or fp32, see :func:`compute_dtype_for`) and their gradients are returned in
    their own dtype. Dropout multiplies
    x by a 0/1 mask and applies its ``1/(1-p)`` to the small (N × r) product instead of the (N × in) input.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, dropout_p: float):
        ctx.compute_dtype = compute_dtype_for(x, weight)  # fp32 where bf16 GEMMs are slow (see lorafit.matmul)
        y, xa, seed = lora_forward(x.reshape(-1, x.shape[-1]), weight, bias, lora_a, lora_b, scaling, dropout_p,
                                   ctx.compute_dtype)
        ctx.save_for_backward(x, weight, lora_a, lora_b, xa, seed)
        ctx.scaling, ctx.dropout_p = scaling, dropout_p
        ctx.has_bias = bias is not None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_a, lora_b, xa, seed = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:5])
        needs[2] = needs[2] and ctx.has_bias
        grad_x, grad_w, grad_bias, grad_a, grad_b = lora_backward(
            grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1]), weight, lora_a, lora_b, xa,
            seed, ctx.scaling, ctx.dropout_p, needs, ctx.compute_dtype)
        if grad_x is not None:
            grad_x = grad_x.view(x.shape)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None


def compute_dtype_for(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """fp32 for a frozen bf16 base on a CPU whose bf16 GEMMs are slow, else ``x.dtype``."""
    rows = x.numel() // max(x.shape[-1], 1)
    return x.dtype if weight.requires_grad else matmul.compute_dtype(x.dtype, x.device, rows)


class LoraLinear(nn.Module):
    """A frozen ``nn.Linear`` (or GPT-2 ``Conv1D``) plus a trainable low-rank update.

    Args:
        base_layer: the layer being adapted; kept as ``self.base_layer`` (PEFT's attribute name, so state-dict
            keys match PEFT's ``...q_proj.base_layer.weight`` / ``...q_proj.lora_A.weight``).
        r: rank of the update.
        alpha: scale numerator; the update is multiplied by ``alpha / r`` (``alpha / √r`` with ``use_rslora``).
        dropout: probability of zeroing an input feature of the LoRA branch (not the base path).
        init: ``"kaiming"`` (PEFT default), ``"gaussian"`` (A ~ N(0, 1/r)) or ``"pissa"`` (principal singular
            vectors of W move into A, B; W keeps the residual — Meng et al. 2024).
        adapter_dtype: dtype of A and B (fp32 by default, also under a bf16 base: the optimizer updates
            would otherwise vanish in bf16 rounding).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        adapter_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if not isinstance(base_layer, WRAPPABLE):
            raise TypeError(f"LoraLinear wraps nn.Linear or Conv1D, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D) if Conv1D else False
        out_features, in_features = self._weight_out_in().shape
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.dropout_p, self.use_rslora = r, alpha, float(dropout), use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        device = base_layer.weight.device
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=adapter_dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=adapter_dtype)
        self.merged = False
        self.disabled = False
        self.group = None  # lora.group.SharedInput: siblings reading the same input, run as one function
        self.pissa_init: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reset_parameters(init)

    # --- initialisation -------------------------------------------------------------------------------
    def reset_parameters(self, init: str = "kaiming") -> None:
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
        elif init == "pissa":
            self._init_pissa()
            return
        else:
            raise ValueError(f"unknown init {init!r}")
        nn.init.zeros_(self.lora_B.weight)

    @torch.no_grad()
    def _init_pissa(self) -> None:
        """PiSSA: A, B take the top-r singular triplets of W (scaled so s·B A equals them); W keeps the rest."""
        w = self._weight_out_in().float()
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)
        sr = sv[: self.r] / self.scaling
        self.lora_A.weight.copy_(torch.diag(sr.sqrt()) @ vh[: self.r])
        self.lora_B.weight.copy_(u[:, : self.r] @ torch.diag(sr.sqrt()))
        self._add_to_weight(-self.delta_weight())
        # The starting point, to save the trained adapter as plain LoRA against the original W (see io.py).
        self.pissa_init = (self.lora_A.weight.detach().clone(), self.lora_B.weight.detach().clone())

    # --- weights --------------------------------------------------------------------------------------
    def _weight_out_in(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    def delta_weight(self) -> torch.Tensor:
        """``s · B A`` in fp32, shaped (out × in)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def _add_to_weight(self, delta: torch.Tensor) -> None:
        w = self.base_layer.weight
        w.add_((delta.t() if self.fan_in_fan_out else delta).to(w.dtype))

    @torch.no_grad()
    def merge(self, safe: bool = False) -> None:
        """Fold the update into the base weight. ``safe``: check the result is finite before writing it."""
        if self.merged:
            return
        if safe:
            merged = self._weight_out_in().float() + self.delta_weight()
            if not torch.isfinite(merged).all():
                raise ValueError("merging would write NaN/inf into the base weight")
        self._add_to_weight(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._add_to_weight(-self.delta_weight())
            self.merged = False

    # --- forward --------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x)
        if getattr(self, "group", None) is not None:  # getattr: layers pickled before groups existed
            y = self.group(self, x)
            if y is not None:
                return y
        args = self.function_args()
        if args[0].dtype != x.dtype:
            x = x.to(args[0].dtype)
        return LoraLinearFunction.apply(x, *args)

    def function_args(self) -> tuple:
        """What :class:`LoraLinearFunction` (or a fused caller, see ``train.gated_mlp``) takes after the input:
        ``(weight (out × in), bias, A, B, scaling, dropout p)``."""
        # The dropout mask comes from torch's global RNG: a checkpoint's saved RNG state reproduces it on resume,
        # and activation checkpointing's RNG replay reproduces it on recomputation.
        dropout = self.dropout_p if self.training else 0.0
        return (self._weight_out_in(), self.base_layer.bias, self.lora_A.weight, self.lora_B.weight, self.scaling,
                dropout)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, "
            f"scaling={self.scaling:.4g}, dropout={self.dropout_p}, merged={self.merged}"
        )
