"""Route a model's RoPE through :class:`lorafit.kernels.rotary.RotaryFunction`, for that model only.

transformers' attention modules call their modelling module's ``apply_rotary_pos_emb`` function directly;
there is no per-model switch for it. So the module-level function is wrapped in a dispatcher that is inert
by default — it calls transformers' own function — and takes the lean path only while an attention module of
a patched model runs (forward hooks on those modules set a context variable; activation checkpointing's
recomputation runs the same hooks, so forward and recomputation take the same path). Other models in the
process compute exactly as before. The dispatcher is removed when the last model using it is restored.
Anything without gradients (generation, evaluation) takes transformers' function too.
"""

from __future__ import annotations

import sys
import weakref
from contextvars import ContextVar

import torch
from torch import nn

from lorafit.kernels.rotary import RotaryFunction
from lorafit.options import RuntimeOptions
from lorafit.patches.families import attention_modules

_ACTIVE: ContextVar[RuntimeOptions | None] = ContextVar("lorafit_rope", default=None)
_INSTALLED: dict[str, list] = {}  # modelling module name -> [module, transformers' function, users]


def _dispatcher(original):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        options = _ACTIVE.get()
        trained = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        if options is None or not trained or cos.requires_grad or sin.requires_grad:
            return original(q, k, cos, sin, unsqueeze_dim)
        return RotaryFunction.apply(q, k, cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim),
                                    options.compile)

    apply_rotary_pos_emb.lorafit_original = original
    return apply_rotary_pos_emb


def _install(module_name: str) -> bool:
    entry = _INSTALLED.get(module_name)
    if entry is None:
        module = sys.modules.get(module_name)
        original = getattr(module, "apply_rotary_pos_emb", None)
        if original is None:
            return False
        module.apply_rotary_pos_emb = _dispatcher(original)
        entry = _INSTALLED[module_name] = [module, original, 0]
    entry[2] += 1
    return True


def _uninstall(module_name: str) -> None:
    entry = _INSTALLED[module_name]
    entry[2] -= 1
    if entry[2] == 0:
        entry[0].apply_rotary_pos_emb = entry[1]
        del _INSTALLED[module_name]


def switch(model: nn.Module, options: RuntimeOptions) -> list:
    """Hook every attention module of ``model`` so its RoPE runs lean; returns what :func:`restore` takes.
    A model that is garbage-collected unpatched releases its share of the dispatcher too."""
    attention = attention_modules(model)
    names = [n for n in sorted({type(m).__module__ for m in attention}) if _install(n)]
    if not names:
        return []
    handles = []
    for m in attention:
        if type(m).__module__ not in names:
            continue
        tokens: list = []  # one per call in flight: the hook pair sets and resets the context variable
        handles.append(m.register_forward_pre_hook(lambda *_, t=tokens: t.append(_ACTIVE.set(options))))
        handles.append(m.register_forward_hook(lambda *_, t=tokens: _ACTIVE.reset(t.pop()), always_call=True))
    release = weakref.finalize(model, _release, names)
    return [(handles, release)]


def _release(names: list[str]) -> None:
    for name in names:
        _uninstall(name)


def restore(switched: list) -> None:
    for handles, release in switched:
        for h in handles:
            h.remove()
        release()  # once: a finalizer runs at most once
