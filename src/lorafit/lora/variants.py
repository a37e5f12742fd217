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

from lorafit.kernels.lora_branch import LoraLinearFunction


class LoraVariant:
    """Plain LoRA (Hu et al. 2021): ``h = W x + b + s · B A dropout(x)``; merging adds ``s · B A`` to ``W``."""

    name = "lora"
    lean = True

    def init(self, layer) -> None:
        """Create the variant's own parameters on ``layer`` once A and B are initialised (plain LoRA: none)."""

    def delta_weight(self, layer) -> torch.Tensor:
        """The update to ``W`` in fp32, shaped (out × in)."""
        return (layer.lora_B.weight.float() @ layer.lora_A.weight.float()) * layer.scaling

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        """The layer's output for an active, unmerged adapter (groups aside: the layer tries those first)."""
        br = layer.branch()
        if br.weight.dtype != x.dtype:
            x = x.to(br.weight.dtype)
        return LoraLinearFunction.apply(x, br.weight, br.bias, br.lora_a, br.lora_b, br.scaling, br.dropout_p,
                                        layer.options)


PLAIN = LoraVariant()
