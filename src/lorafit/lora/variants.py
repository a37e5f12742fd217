"""LoRA variants: what one kind of adapter computes — its weight update and its forward pass.

:class:`~lorafit.lora.layer.LoraLinear` owns the modules (``base_layer``, ``lora_A``, ``lora_B``), their
initialisation and the merged/disabled state; it asks its variant for the math. A new kind of LoRA (DoRA's
magnitude vector, a 4-bit base dequantised in forward and backward) subclasses :class:`LoraVariant` and
overrides what differs, without branches in the layer, in the groups or in the patches. ``lean`` says whether
the layer may run inside the fused kernels that assume plain LoRA (the shared-input group, the gated MLP's
fused ``down_proj``); a variant that sets it False still trains, one layer at a time.
"""

from __future__ import annotations

import torch
from torch import nn

from lorafit.kernels import dora
from lorafit.kernels.lora_branch import LoraLinearFunction


class LoraVariant:
    """Plain LoRA (Hu et al. 2021): ``h = W x + b + s · B A dropout(x)``; merging adds ``s · B A`` to ``W``."""

    name = "lora"
    lean = True

    def init(self, layer) -> None:
        """Create the variant's own parameters on ``layer`` once A and B are initialised (plain LoRA: none)."""

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


PLAIN = LoraVariant()
DORA = DoraVariant()
