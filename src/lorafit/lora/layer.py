"""The LoRA linear layer: a frozen ``nn.Linear`` (or GPT-2 ``Conv1D``) plus a trainable low-rank update.

Math (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"; identical to PEFT)::

    h = W x + b + s · B A dropout(x)        A: (r × in), B: (out × r), s = alpha / r   (rsLoRA: alpha / √r)

``A`` starts kaiming-uniform with a = √5 (what ``nn.Linear`` uses, and PEFT), ``B`` starts at zero, so a fresh
adapter leaves the model unchanged. Merging adds ``s · B A`` to ``W``; unmerging subtracts it.

The math is the layer's variant's (:mod:`lorafit.lora.variants`; plain LoRA runs
:class:`lorafit.kernels.lora_branch.LoraLinearFunction`, which saves far less for backward than autograd would:
why and what, see that module; DoRA adds a magnitude vector, :mod:`lorafit.kernels.dora`); siblings that read
the same input may run as one function instead (:mod:`lorafit.lora.group`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorafit.kernels.lora_branch import Branch
from lorafit.lora.variants import PLAIN, LoraVariant
from lorafit.options import RuntimeOptions

try:  # GPT-2 style layers: weight stored as (in, out), y = x W + b.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()

WRAPPABLE = (nn.Linear, Conv1D)


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
        options: how the kernels run (:class:`lorafit.options.RuntimeOptions`); default: resolved from the
            environment once, here.
        variant: what kind of LoRA computes the update and the forward pass (:mod:`lorafit.lora.variants`);
            plain LoRA by default.
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
        options: RuntimeOptions | None = None,
        variant: LoraVariant = PLAIN,
    ):
        super().__init__()
        if not isinstance(base_layer, WRAPPABLE):
            raise TypeError(f"LoraLinear wraps nn.Linear or Conv1D, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D) if Conv1D else False
        # a 4-bit base's weight is packed codes: its shape is not (out × in), the module's features are
        out_features, in_features = ((base_layer.out_features, base_layer.in_features) if variant.name == "qlora"
                                     else self._weight_out_in().shape)
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.dropout_p, self.use_rslora = r, alpha, float(dropout), use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        device = base_layer.weight.device
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=adapter_dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=adapter_dtype)
        self.merged = False
        self.disabled = False
        self.group = None  # lora.group.SharedInput: siblings reading the same input, run as one function
        self.options = options or RuntimeOptions.resolve()
        self.variant = variant
        self.pissa_init: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reset_parameters(init)
        variant.init(self)

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
        self._add_to_weight(-PLAIN.delta_weight(self))  # s·B A, whatever the variant
        # The starting point, to save the trained adapter as plain LoRA against the original W (see io.py).
        self.pissa_init = (self.lora_A.weight.detach().clone(), self.lora_B.weight.detach().clone())

    # --- weights --------------------------------------------------------------------------------------
    def _weight_out_in(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    @property
    def base_dtype(self) -> torch.dtype:
        """The dtype the base computes in: its weight's, or a 4-bit or 8-bit base's compute dtype (an 8-bit layer
        lorafit did not quantize has none: fp32, as transformers' 8-bit loader computes without torch_dtype)."""
        dtype = getattr(self.base_layer, "compute_dtype", None) or self.base_layer.weight.dtype
        return torch.float32 if dtype == torch.int8 else dtype

    def delta_weight(self) -> torch.Tensor:
        """What merging adds to the base weight, in fp32, shaped (out × in) (``s · B A`` for plain LoRA)."""
        return self.variant.delta_weight(self)

    @torch.no_grad()
    def _add_to_weight(self, delta: torch.Tensor) -> None:
        w = self.base_layer.weight
        w.add_((delta.t() if self.fan_in_fan_out else delta).to(w.dtype))

    @torch.no_grad()
    def _set_weight(self, weight: torch.Tensor) -> None:
        """Overwrite the base weight with ``weight`` (out × in), rounded once to its dtype."""
        self.base_layer.weight.copy_(weight.t() if self.fan_in_fan_out else weight)

    @torch.no_grad()
    def merge(self, safe: bool = False) -> None:
        """Fold the update into the base weight. ``safe``: check the result is finite before writing it."""
        if self.merged:
            return
        if safe:
            merged = self.variant.dense_weight(self).float() + self.delta_weight()
            if not torch.isfinite(merged).all():
                raise ValueError("merging would write NaN/inf into the base weight")
        self.variant.merge(self)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.variant.unmerge(self)
            self.merged = False

    # --- forward --------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x)
        if getattr(self, "group", None) is not None:  # getattr: layers pickled before groups existed
            y = self.group(self, x)
            if y is not None:
                return y
        return self.variant.forward(self, x)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors an adapter file holds, by name under the layer's path (PEFT's names)."""
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight,
                **self.variant.tensors(self)}

    def branch(self) -> Branch:
        """This layer's operands for the kernels: weight (out × in), bias, A, B, scaling, dropout p (0 in eval)."""
        # The dropout mask comes from torch's global RNG: a checkpoint's saved RNG state reproduces it on resume,
        # and activation checkpointing's RNG replay reproduces it on recomputation.
        dropout = self.dropout_p if self.training else 0.0
        return Branch(self._weight_out_in(), self.base_layer.bias, self.lora_A.weight, self.lora_B.weight,
                      self.scaling, dropout)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, "
            f"scaling={self.scaling:.4g}, dropout={self.dropout_p}, merged={self.merged}"
            + ("" if self.variant.name == "lora" else f", variant={self.variant.name}")
        )
