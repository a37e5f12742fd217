"""Switch a model's gated MLPs to :mod:`lorafit.kernels.gated_mlp`: ``ActMul``, or ``ActMulLoraDown`` when
``down_proj`` is an active LoRA layer over a frozen base."""

from __future__ import annotations

import torch
from torch import nn

from lorafit.kernels.gated_mlp import ActMul, ActMulLoraDown
from lorafit.lora.layer import LoraLinear
from lorafit.options import RuntimeOptions
from lorafit.patches.instance import restore_forward, switch_forward


def _fusable_down(down: nn.Module, g: torch.Tensor) -> bool:
    """Whether ``down`` can run inside ``ActMulLoraDown``: an active LoRA layer over a frozen base, training."""
    return (isinstance(down, LoraLinear) and down.variant.lean and not (down.merged or down.disabled)
            and torch.is_grad_enabled()
            and not down.base_layer.weight.requires_grad and down.base_dtype == g.dtype)


def _lean_forward(self, x):
    g, u = self.gate_proj(x), self.up_proj(x)
    if _fusable_down(self.down_proj, g):
        br = self.down_proj.branch()
        return ActMulLoraDown.apply(g, u, self.act_fn, br.weight, br.bias, br.lora_a, br.lora_b, br.scaling,
                                    br.dropout_p, self.lorafit_options)
    return self.down_proj(ActMul.apply(g, u, self.act_fn, self.lorafit_options.compile))


def switch(model: nn.Module, classes: tuple[str, ...], options: RuntimeOptions) -> list[nn.Module]:
    """Give every gated MLP of ``model`` whose class is in ``classes`` the lean forward; returns them."""
    return switch_forward(model, classes, _lean_forward, options, needs=("gate_proj", "up_proj", "down_proj", "act_fn"))


restore = restore_forward
