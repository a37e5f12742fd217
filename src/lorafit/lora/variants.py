"""LoRA variants: what one kind of adapter computes — its weight update and its forward pass.

:class:`~lorafit.lora.layer.LoraLinear` owns the modules (``base_layer``, ``lora_A``, ``lora_B``), their
initialisation and the merged/disabled state; it asks its variant for the math. A new kind of LoRA (DoRA's
magnitude vector, a 4-bit base dequantised in forward and backward) subclasses :class:`LoraVariant` and
overrides what differs, without branches in the layer, in the groups or in the patches. ``lean`` says whether
the layer may run inside the gated MLP's fused ``down_proj`` kernel, ``groups`` whether it may run in the
shared-input group; both compute plain LoRA (over a dense or a 4-bit weight). A variant that sets them False
still trains, one layer at a time.
"""

from __future__ import annotations

import torch
from torch import nn

from lorafit.kernels import dora, int8, nf4
from lorafit.kernels.lora_branch import LoraLinearFunction


class LoraVariant:
    """Plain LoRA (Hu et al. 2021): ``h = W x + b + s · B A dropout(x)``; merging adds ``s · B A`` to ``W``."""

    name = "lora"
    lean = True
    groups = True

    def init(self, layer) -> None:
        """Create the variant's own parameters on ``layer`` once A and B are initialised (plain LoRA: none)."""

    def dense_weight(self, layer) -> torch.Tensor:
        """The base weight (out × in) as a dense tensor (a view of the parameter for a dense base)."""
        return layer._weight_out_in()

    def delta_weight(self, layer) -> torch.Tensor:
        """What merging adds to the (unmerged) ``W``, in fp32, shaped (out × in)."""
        return (layer.lora_B.weight.float() @ layer.lora_A.weight.float()) * layer.scaling

    def tensors(self, layer) -> dict[str, torch.Tensor]:
        """The variant's own tensors an adapter file holds, by name under the layer's path (plain LoRA: none)."""
        return {}

    @torch.no_grad()
    def merge(self, layer) -> None:
        """Fold the update into the base weight (the layer checks it is not merged yet)."""
        layer._add_to_weight(self.delta_weight(layer))

    @torch.no_grad()
    def unmerge(self, layer) -> None:
        layer._add_to_weight(-self.delta_weight(layer))

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        """The layer's output for an active, unmerged adapter (groups aside: the layer tries those first)."""
        br = layer.branch()
        if br.weight.dtype != x.dtype:
            x = x.to(br.weight.dtype)
        return LoraLinearFunction.apply(x, br.weight, br.bias, br.lora_a, br.lora_b, br.scaling, br.dropout_p,
                                        layer.options)


class DoraVariant(LoraVariant):
    """DoRA (Liu et al. 2024), PEFT's ``use_dora``: ``W' = m · (W + s B A) / ‖W + s B A‖`` per output row.

    The magnitude ``m`` is the layer's ``lora_magnitude_vector`` (PEFT's name, so the file key is
    ``...<path>.lora_magnitude_vector``), initialised to the row norms of ``W + s B A``; the math, dropout
    included, is :mod:`lorafit.kernels.dora`'s. Not lean: groups and the fused gated MLP leave it alone.
    """

    name = "dora"
    lean = False
    groups = False

    def init(self, layer) -> None:
        br = layer.branch()
        norm = dora.row_norms(br.weight, br.lora_a, br.lora_b, br.scaling)
        layer.lora_magnitude_vector = nn.Parameter(norm.to(layer.lora_A.weight.dtype))

    def tensors(self, layer) -> dict[str, torch.Tensor]:
        return {"lora_magnitude_vector": layer.lora_magnitude_vector}

    def _merged(self, layer) -> tuple[torch.Tensor, torch.Tensor]:
        return dora.merged_weight(layer._weight_out_in(), super().delta_weight(layer), layer.lora_magnitude_vector)

    def delta_weight(self, layer) -> torch.Tensor:
        return self._merged(layer)[0] - layer._weight_out_in().float()

    @torch.no_grad()
    def merge(self, layer) -> None:
        merged, norm = self._merged(layer)
        layer._set_weight(merged)
        layer.dora_merged_norm = norm  # unmerging divides by the factor merging used (PEFT keeps it too)

    @torch.no_grad()
    def unmerge(self, layer) -> None:
        f = layer.lora_magnitude_vector.float() / layer.dora_merged_norm
        layer._set_weight(layer._weight_out_in().float() / f.view(-1, 1) - super().delta_weight(layer))
        del layer.dora_merged_norm

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        br = layer.branch()
        if br.weight.dtype != x.dtype:
            x = x.to(br.weight.dtype)
        # the norm anew on every call, as PEFT does by default: a cache keyed on tensor versions would go stale
        # (torch's fused AdamW updates A and B in place without bumping their version counters)
        norm = dora.row_norms(br.weight, br.lora_a, br.lora_b, br.scaling)
        return dora.DoraLinearFunction.apply(x, br.weight, br.bias, br.lora_a, br.lora_b,
                                             layer.lora_magnitude_vector, norm, br.scaling, br.dropout_p,
                                             layer.options)


class QLoraVariant(LoraVariant):
    """Plain LoRA over a frozen 4-bit base (QLoRA, Dettmers et al. 2023): ``base_layer`` is bitsandbytes'
    ``Linear4bit``, as transformers loads it (under FSDP2 ``nf4.ShardableLinear4bit``, whose ``weight`` is the same
    ``Params4bit`` over the gathered codes), and ``W = dequantize(codes, absmax)`` (:mod:`lorafit.kernels.nf4`) is
    formed in forward and again in backward, never kept.

    Merging writes a dense 16/32-bit weight ``dequantize(W₄) + s · B A`` — the weights the adapter was trained
    against — into a plain ``nn.Linear`` that replaces the 4-bit layer (re-quantizing the sum would lose most of
    the update in 4-bit rounding); unmerging puts the 4-bit layer back. Lean: the shared-input groups (q/k/v,
    gate/up) and the gated MLP's fused ``down_proj`` take 4-bit layers; they dequantize where they multiply
    (``nf4.dense``), outside their compiled elementwise kernels, and keep only the packed weight.
    """

    name = "qlora"
    lean = True
    groups = True

    def dense_weight(self, layer) -> torch.Tensor:
        return nf4.dequantize(layer.base_layer.weight)

    @torch.no_grad()
    def merge(self, layer) -> None:
        packed = layer.base_layer
        dense = nn.Linear(layer.in_features, layer.out_features, bias=packed.bias is not None,
                          device=packed.weight.device, dtype=layer.base_dtype)
        dense.weight.copy_(self.dense_weight(layer).float() + self.delta_weight(layer))
        if packed.bias is not None:
            dense.bias.copy_(packed.bias)
        dense.requires_grad_(False)
        layer.quantized_base, layer.base_layer = packed, dense

    @torch.no_grad()
    def unmerge(self, layer) -> None:
        layer.base_layer = layer._modules.pop("quantized_base")

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        base = layer.base_layer
        if x.dtype != layer.base_dtype:
            x = x.to(layer.base_dtype)
        return nf4.QLoraLinearFunction.apply(x, base.weight, base.bias, layer.lora_A.weight, layer.lora_B.weight,
                                             layer.scaling, layer.dropout_p if layer.training else 0.0,
                                             layer.options)


class Int8LoraVariant(QLoraVariant):
    """Plain LoRA over a frozen 8-bit base (LLM.int8, transformers' ``load_in_8bit`` + PEFT): ``base_layer`` is
    bitsandbytes' ``Linear8bitLt`` (under FSDP2 ``int8.ShardableLinear8bit``, the same matmul) and its own
    forward computes the base output (so the base math is PEFT's to the bit); lorafit's LoRA branch is added to it (:class:`lorafit.kernels.int8.LoraDeltaFunction`).

    Merging is QLoRA's: a dense ``dequantize(int8 W) + s · B A`` replaces the 8-bit layer. Not lean: the
    shared-input groups and the fused gated MLP multiply by a dense weight themselves, which would not be the
    int8 layer's matmul, so its layers run one at a time (as DoRA's do).
    """

    name = "int8"
    lean = False
    groups = False

    def dense_weight(self, layer) -> torch.Tensor:
        return int8.dequantize(layer.base_layer)

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != layer.base_dtype:
            x = x.to(layer.base_dtype)
        base = layer.base_layer(x)
        return int8.LoraDeltaFunction.apply(base, x, layer.lora_A.weight, layer.lora_B.weight, layer.scaling,
                                            layer.dropout_p if layer.training else 0.0, layer.options)


PLAIN = LoraVariant()
DORA = DoraVariant()
QLORA = QLoraVariant()
INT8 = Int8LoraVariant()
