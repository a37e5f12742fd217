"""Switch a model's Llama-style RMSNorm modules to :class:`lorafit.kernels.rms_norm.RMSNormFunction`."""

from __future__ import annotations

from torch import nn

from lorafit.kernels.rms_norm import RMSNormFunction
from lorafit.options import RuntimeOptions
from lorafit.patches.instance import restore_forward, switch_forward


def _lean_forward(self, hidden_states):
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon, self.lorafit_options.compile)


def switch(model: nn.Module, classes: tuple[str, ...], options: RuntimeOptions) -> list[nn.Module]:
    """Give every module of ``model`` whose class is in ``classes`` the lean forward; returns them."""
    return switch_forward(model, classes, _lean_forward, options, needs=("variance_epsilon",))


restore = restore_forward
