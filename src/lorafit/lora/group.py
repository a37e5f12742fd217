"""LoRA layers that read the same input (q/k/v of an attention block, gate/up of an MLP), run as one function.

The math, and why it saves passes over memory, is :mod:`lorafit.kernels.lora_group`'s. This module decides
which modules form a group and when a group may run.

Transformers' attention calls ``q_proj(x)``, ``k_proj(x)``, ``v_proj(x)`` in turn: the first member's call
computes the whole group and keeps the other outputs; each other member then takes its own, provided it is
called next on the very same, unmodified tensor. Where siblings read different tensors, the first miss turns
the group off (that forward's k/v are computed twice and draw fresh seeds; after that the layers run one by
one). Hooks on the later members see their calls but not the compute.
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import nn

from lorafit.kernels.lora_group import LoraGroupFunction, flatten
from lorafit.lora.layer import LoraLinear


class SharedInput:
    """The LoRA layers of one block that read the same tensor, run together (see the module docstring).

    The first member's call computes the group; each other member takes its output if called next on the very
    same, unmodified tensor. A member called on anything else (a model whose siblings read different tensors)
    or not called at all turns the group off for good: it then computes alone, as do all of them from then on.
    Holds its layers by weak reference (they hold it), so a model is still freed by reference counting.
    """

    def __init__(self, layers: list[LoraLinear]):
        self._layers = [weakref.ref(m) for m in layers]
        self.active = True
        self._pending: list[tuple] = []  # (layer, x, x's version, output) for the members not yet called

    @property
    def layers(self) -> list[LoraLinear]:
        return [r() for r in self._layers]

    def _runnable(self, layers, x: torch.Tensor) -> bool:
        if not (self.active and torch.is_grad_enabled()):
            return False
        return all(
            m is not None and m.training and m.variant.groups and not (m.merged or m.disabled)
            and not m.base_layer.weight.requires_grad
            and m.base_dtype == x.dtype and m.dropout_p == layers[0].dropout_p
            for m in layers)

    def _off(self) -> None:
        self.active = False
        self._pending = []

    def __call__(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor | None:
        """``layer``'s output, or None when ``layer`` should compute alone."""
        layers = self.layers
        if layer is layers[0]:
            if self._pending:  # a member was not called since the last group: its siblings read something else
                self._off()
            if not self._runnable(layers, x):
                return None
            branches = [m.branch() for m in layers]
            outs = LoraGroupFunction.apply(x, branches[0].dropout_p, layers[0].options, *flatten(branches))
            self._pending = [(m, x, x._version, y) for m, y in zip(layers[1:], outs[1:], strict=True)]
            return outs[0]
        if not self._pending:
            return None
        m, px, version, y = self._pending.pop(0)
        if m is layer and px is x and version == x._version:
            return y
        self._off()
        return None

    def __deepcopy__(self, memo):
        new = SharedInput.__new__(SharedInput)
        memo[id(self)] = new
        new._layers = [weakref.ref(copy.deepcopy(m, memo)) for m in self.layers]
        new.active, new._pending = self.active, []
        return new

    def __getstate__(self):  # pickling: strong references (weak ones cannot be pickled)
        return {"layers": self.layers, "active": self.active}

    def __setstate__(self, state):
        self._layers = [weakref.ref(m) for m in state["layers"]]
        self.active, self._pending = state["active"], []


# Sibling projections that read the same tensor in transformers' attention blocks and gated MLPs.
_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def use_shared_input_groups(model: nn.Module) -> list[SharedInput]:
    """Group the LoRA q/k/v and gate/up projections of every block of ``model`` (in place); returns the groups
    (:func:`remove_shared_input_groups` undoes it)."""
    groups = []
    for module in model.modules():
        for names in _GROUPS:
            layers = [getattr(module, n, None) for n in names]
            if not all(isinstance(m, LoraLinear) and not m.fan_in_fan_out for m in layers):
                continue
            if len({m.in_features for m in layers}) != 1:
                continue
            group = SharedInput(layers)
            for m in layers:
                m.group = group
            groups.append(group)
    return groups


def remove_shared_input_groups(groups: list[SharedInput]) -> None:
    """Let the layers of ``groups`` compute one by one again."""
    for group in groups:
        for m in group.layers:
            if m is not None and m.group is group:
                m.group = None
