"""Switching one module instance's ``forward`` (and handing it the run's options), and switching it back.

The instance attribute shadows the class's method for that module only: other instances of the class, other
models, and transformers' own code are untouched; deleting the attribute restores the class's forward.
"""

from __future__ import annotations

import types
from collections.abc import Callable

from torch import nn

from lorafit.options import RuntimeOptions


def switch_forward(model: nn.Module, classes: tuple[str, ...], forward: Callable, options: RuntimeOptions,
                   needs: tuple[str, ...] = ()) -> list[nn.Module]:
    """Give every module of ``model`` whose class is named in ``classes`` and that has the attributes ``needs``
    the forward ``forward(self, ...)`` and ``self.lorafit_options``; returns the modules switched."""
    switched = []
    for module in model.modules():
        if type(module).__name__ in classes and "forward" not in vars(module) and all(
                hasattr(module, a) for a in needs):
            module.lorafit_options = options
            module.forward = types.MethodType(forward, module)
            switched.append(module)
    return switched


def restore_forward(modules: list[nn.Module]) -> None:
    for module in modules:
        vars(module).pop("forward", None)
        vars(module).pop("lorafit_options", None)
