"""Model surgery: find the target layers, wrap them in :class:`LoraLinear`, freeze the rest, and undo it.

Works on any module tree; transformers causal LMs (Llama, Qwen2, Mistral, Gemma, GPT-2's Conv1D, Phi …) are the
intended case. The model stays the user's own object: after :func:`apply_lora` it is the same model with some
layers wrapped and ``model.lora_config`` set.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lorafit import targets as targets_rule
from lorafit.errors import LorafitError
from lorafit.kernels import nf4
from lorafit.lora.config import ALL_LINEAR, LoraConfig
from lorafit.lora.layer import WRAPPABLE, LoraLinear
from lorafit.lora.variants import DORA, PLAIN, QLORA
from lorafit.options import RuntimeOptions


def output_head_names(model: nn.Module) -> set[str]:
    """Dotted names of the output projection(s), excluded from ``all-linear`` (as PEFT does)."""
    names = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if module is head or name.split(".")[-1] in ("lm_head", "embed_out"):
            names.add(name)
    return names


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Dotted names of the modules ``config`` selects. Raises a clear error for typos and unwrappable types."""
    heads = output_head_names(model)
    targets = config.target_modules
    matched, unwrappable = [], []
    for name, module in model.named_modules():
        if not name or isinstance(module, LoraLinear) or ".base_layer" in name or ".lora_" in name:
            continue
        if targets == ALL_LINEAR and not isinstance(module, WRAPPABLE):
            continue
        if not targets_rule.selected(name, targets, config.layers_to_transform, heads):
            continue
        (matched if isinstance(module, WRAPPABLE) else unwrappable).append((name, module))
    if unwrappable:
        name, module = unwrappable[0]
        raise LorafitError(
            f"lora target {name!r} is a {type(module).__name__}; lorafit can wrap Linear and Conv1D layers only "
            "(train it fully with modules_to_save instead)"
        )
    available = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, WRAPPABLE)} - {
        h.split(".")[-1] for h in heads})
    for t in targets_rule.unmatched_names(targets, [n for n, _ in matched]):
        raise LorafitError(f"lora target_modules entry {t!r} matches no Linear layer; this model has: {', '.join(available)}")
    if not matched:
        raise LorafitError(
            f"lora target_modules {targets!r} (layers {config.layers_to_transform}) match nothing; "
            f"this model's linear layers are: {', '.join(available)}"
        )
    return [n for n, _ in matched]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_lora(model: nn.Module, config: LoraConfig, adapter_dtype: torch.dtype = torch.float32,
               options: RuntimeOptions | None = None) -> nn.Module:
    """Wrap the targets of ``config`` in ``model`` (in place), freeze everything else, and return ``model``.
    ``options``: how the layers' kernels run (default: resolved from the environment, once, here)."""
    if getattr(model, "lora_config", None) is not None:
        raise LorafitError("this model already has a LoRA adapter; merge_and_unload it before adding another")
    options = options or RuntimeOptions.resolve()
    names = find_targets(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        layer = LoraLinear(
            base,
            r=config.rank_for(name),
            alpha=config.alpha_for(name),
            dropout=config.dropout,
            use_rslora=config.use_rslora,
            init=config.init,
            adapter_dtype=adapter_dtype,
            options=options,
            variant=_variant(name, base, config),
        )
        _set_submodule(model, name, layer)
    _mark_bias_trainable(model, config.bias)
    for name in config.modules_to_save or []:
        found = [m for n, m in model.named_modules() if n == name or n.endswith("." + name)]
        if not found:
            raise LorafitError(f"lora modules_to_save entry {name!r} matches no module in this model")
        for m in found:
            m.requires_grad_(True)
    model.lora_config = config
    return model


def _variant(name: str, base: nn.Module, config: LoraConfig):
    """The kind of LoRA a target gets: QLoRA over a 4-bit base, DoRA when asked, else plain."""
    if not nf4.is_4bit(base.weight):
        return DORA if config.use_dora else PLAIN
    if config.use_dora or config.init == "pissa":
        raise LorafitError(f"lora target {name!r} has a 4-bit base: DoRA and PiSSA need the dense weight; "
                           "use plain LoRA (or load the base in bf16/fp32)")
    return QLORA


def _mark_bias_trainable(model: nn.Module, mode: str) -> None:
    if mode == "all":
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.requires_grad_(True)
    elif mode == "lora_only":
        for layer in lora_layers(model):
            if layer.base_layer.bias is not None:
                layer.base_layer.bias.requires_grad_(True)


def lora_layers(model: nn.Module) -> list[LoraLinear]:
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def named_lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    for name, m in model.named_modules():
        if isinstance(m, LoraLinear):
            yield name, m


def _require_lora(model: nn.Module) -> list[LoraLinear]:
    layers = lora_layers(model)
    if not layers:
        raise LorafitError("this model has no LoRA layers (apply_lora or load_adapter first)")
    return layers


def merge(model: nn.Module, safe: bool = False) -> nn.Module:
    """Fold each adapter into its base weight (``s·B A`` added; DoRA: the rescaled weight written). ``safe``
    checks every result for NaN/inf first."""
    layers = _require_lora(model)
    if safe:
        for name, layer in named_lora_layers(model):
            if not layer.merged and not torch.isfinite(layer.variant.dense_weight(layer).float()
                                                       + layer.delta_weight()).all():
                raise LorafitError(f"refusing to merge: {name} would get NaN/inf weights (the adapter is broken)")
    for layer in layers:
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for layer in _require_lora(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module, safe: bool = True) -> nn.Module:
    """Merge, then replace every LoRA layer by its base layer: a plain transformers model is left."""
    merge(model, safe=safe)
    for name, layer in list(named_lora_layers(model)):
        _set_submodule(model, name, layer.base_layer)
    model.lora_config = None
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove the adapters without merging: the original base model is back."""
    unmerge(model)
    for name, layer in list(named_lora_layers(model)):
        _set_submodule(model, name, layer.base_layer)
    model.lora_config = None
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Within the block the model computes as its base (merged adapters are unmerged and re-merged after)."""
    layers = _require_lora(model)
    was_merged = [layer.merged for layer in layers]
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, merged in zip(layers, was_merged, strict=True):
            layer.disabled = False
            if merged:
                layer.merge()


@dataclass
class ParameterCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable vs total parameters (tied weights counted once), like PEFT's ``print_trainable_parameters``."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return ParameterCount(trainable, total)
