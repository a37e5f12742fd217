"""Switch a model's Llama-style RMSNorm modules to :class:`lorafit.kernels.rms_norm.RMSNormFunction`."""

from __future__ import annotations

import types

from torch import nn

from lorafit.kernels.rms_norm import RMSNormFunction
from lorafit.options import RuntimeOptions


def _lean_forward(self, hidden_states):
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon, self.lorafit_options.compile)


def switch(model: nn.Module, classes: tuple[str, ...], options: RuntimeOptions) -> list[nn.Module]:
    """Give every module of ``model`` whose class is in ``classes`` the lean forward; returns them."""
    switched = []
    for module in model.modules():
        if type(module).__name__ in classes and hasattr(module, "variance_epsilon") and "forward" not in vars(module):
            module.lorafit_options = options
            module.forward = types.MethodType(_lean_forward, module)
            switched.append(module)
    return switched


def restore(modules: list[nn.Module]) -> None:
    for module in modules:
        vars(module).pop("forward", None)
        vars(module).pop("lorafit_options", None)
