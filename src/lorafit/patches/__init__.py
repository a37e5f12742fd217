"""Per-model switches onto the lean kernels: explicit, opt-in per kernel, applied to one model, reversible.

    handle = apply_lean_kernels(model, options=options)   # all that apply to this model's family
    ...
    handle.restore()                                       # the model computes as transformers wrote it

What each family takes is the table in :mod:`lorafit.patches.families` (matched by ``config.model_type`` and
module class). The switches:

* ``shared_inputs`` — LoRA layers reading the same tensor (q/k/v, gate/up) run as one function
  (:mod:`lorafit.lora.group`); any model, once LoRA is applied;
* ``swiglu`` — gated MLPs keep two activations, not four (:mod:`lorafit.kernels.gated_mlp`);
* ``rms_norm`` — Llama-style RMSNorm with a lean backward (:mod:`lorafit.kernels.rms_norm`);
* ``rope`` — RoPE as one kernel each way (:mod:`lorafit.kernels.rotary`);
* ``attention`` — causal attention of a bf16 model on fp32 copies where that is faster
  (:mod:`lorafit.kernels.attention`); any model running SDPA.

A family without lean kernels trains on the plain path (its LoRA layers are still lean) and
:attr:`LeanKernels.notice` says so once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from lorafit.lora.group import remove_shared_input_groups, use_shared_input_groups
from lorafit.options import RuntimeOptions
from lorafit.patches import attention as attention_patch
from lorafit.patches import gated_mlp as mlp_patch
from lorafit.patches import rms_norm as norm_patch
from lorafit.patches import rotary as rope_patch
from lorafit.patches.families import family_of


@dataclass
class LeanKernels:
    """What :func:`apply_lean_kernels` switched on one model; :meth:`restore` undoes all of it."""

    options: RuntimeOptions
    model_type: str
    applied: dict[str, int] = field(default_factory=dict)  # switch -> how many modules it took
    notice: str | None = None
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()
        self.applied = {}

    def summary(self) -> str:
        on = [f"{name} ×{n}" for name, n in self.applied.items() if n]
        return ", ".join(on) or "none"


def apply_lean_kernels(model: nn.Module, *, options: RuntimeOptions | None = None, shared_inputs: bool = True,
                       swiglu: bool = True, rms_norm: bool = True, rope: bool = True,
                       attention: bool = True) -> LeanKernels:
    """Switch ``model`` (in place) onto the lean kernels its family takes; returns the handle that undoes it,
    also kept as ``model.lean_kernels`` while applied."""
    current = getattr(model, "lean_kernels", None)
    if current is not None:
        raise ValueError("lean kernels are already applied to this model; call model.lean_kernels.restore() first")
    options = options or RuntimeOptions.resolve()
    model_type, family = family_of(model)
    handle = LeanKernels(options, model_type)
    model.lean_kernels = handle
    handle._undo.append(lambda: vars(model).pop("lean_kernels", None))

    def track(name: str, switched: list, undo: Callable[[list], None]) -> None:
        handle.applied[name] = len(switched)
        if switched:
            handle._undo.append(lambda: undo(switched))

    if shared_inputs:
        track("shared_inputs", use_shared_input_groups(model), remove_shared_input_groups)
    if family is not None:
        if swiglu and family.gated_mlp:
            track("swiglu", mlp_patch.switch(model, family.gated_mlp, options), mlp_patch.restore)
        if rms_norm and family.rms_norm:
            track("rms_norm", norm_patch.switch(model, family.rms_norm, options), norm_patch.restore)
        if rope and family.rope:
            track("rope", rope_patch.switch(model, options), rope_patch.restore)
    else:
        handle.notice = (f"model type {model_type or '(unknown)'!r} has no lean kernels in lorafit: its norms, MLPs and "
                         "RoPE run as transformers wrote them (the LoRA layers are lean)")
    if attention:
        track("attention", attention_patch.switch(model, options), attention_patch.restore)
    return handle
