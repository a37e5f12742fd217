"""Model surgery: find the target layers, wrap them in :class:`LoraLinear`, freeze the rest, and undo it.

Works on any module tree; transformers causal LMs (Llama, Qwen2, Mistral, Gemma, GPT-2's Conv1D, Phi …) are the
intended case. The model stays the user's own object: after :func:`apply_lora` it is the same model with some
layers wrapped and ``model.lora_config`` set.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lorafit import targets as targets_rule
from lorafit.errors import LorafitError
from lorafit.kernels import int8, nf4
from lorafit.lora.config import ALL_LINEAR, LoraConfig
from lorafit.lora.embedding import LoraEmbedding
from lorafit.lora.layer import WRAPPABLE, LoraLinear
from lorafit.lora.parameter import LoraParameter, named_parameter_targets, selects
from lorafit.lora.variants import DORA, INT8, PLAIN, QLORA
from lorafit.options import RuntimeOptions

# What a LoRA target may be: a linear layer (LoraLinear; the output head included when named) or the token
# embeddings (LoraEmbedding, PEFT's lora.Embedding). "all-linear" selects linear layers only.
TARGETABLE = (*WRAPPABLE, nn.Embedding)
ADAPTER_LAYERS = (LoraLinear, LoraEmbedding, LoraParameter)
# PEFT's EMBEDDING_LAYER_NAMES: the names whose presence in target_modules / modules_to_save it checks for tying
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")
TIED_WARNING = ("the model ties its input embeddings and output head, and the adapter includes one of them: as PEFT "
                "does by default, each side is adapted on its own, so they are trained untied; merging such an adapter "
                "can complicate saving the merged model")


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
        if not name or isinstance(module, ADAPTER_LAYERS) or ".base_layer" in name or ".lora_" in name:
            continue
        if targets == ALL_LINEAR and not isinstance(module, WRAPPABLE):
            continue
        if not targets_rule.selected(name, targets, config.layers_to_transform, heads):
            continue
        (matched if isinstance(module, TARGETABLE) else unwrappable).append((name, module))
    if unwrappable:
        name, module = unwrappable[0]
        raise LorafitError(
            f"lora target {name!r} is a {type(module).__name__}; lorafit can wrap Linear, Conv1D and Embedding "
            "layers only (train it fully with modules_to_save instead)"
        )
    available = sorted({_leaf_name(n) for n, m in model.named_modules() if isinstance(m, TARGETABLE)})
    for t in targets_rule.unmatched_names(targets, [n for n, _ in matched]):
        raise LorafitError(f"lora target_modules entry {t!r} matches no Linear layer; this model has: "
                           f"{', '.join(available)}{_regex_hint(t)}")
    if not matched:
        raise LorafitError(
            f"lora target_modules {targets!r} (layers {config.layers_to_transform}) match nothing; "
            f"this model's linear layers are: {', '.join(available)}"
        )
    return [n for n, _ in matched]


def _leaf_name(path: str) -> str:
    """A module's name as a target list names it: ``q_proj``; ``gate_projs.N`` for a layer of a ModuleList."""
    parts = path.split(".")
    return f"{parts[-2]}.N" if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def _regex_hint(entry: str) -> str:
    """A list entry written as a regex (``experts.gate_projs.[0-9]+$``) is a name to PEFT and lorafit alike."""
    if not any(c in entry for c in "[]()*+?$^|\\"):
        return ""
    return ("; entries of a list are names (as in PEFT), not regexes: give lora_target_modules one regex string "
            "matching the whole module path instead, e.g. '.*\\.experts\\.gate_projs\\.[0-9]+'")


def find_parameter_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, str]]:
    """``(module path, parameter name)`` of each parameter ``config.target_parameters`` selects; an entry that
    selects nothing is one line naming the model's 3-D (experts) parameters."""
    if not config.target_parameters:
        return []
    found = named_parameter_targets(model, config.target_parameters)
    keys = [f"{m}.{p}" for m, p in found]
    for entry in config.target_parameters:
        if not any(selects(k, entry) for k in keys):
            raise LorafitError(f"lora target_parameters entry {entry!r} matches no parameter of this model (an entry "
                               "selects the parameters whose full name ends with it, e.g. mlp.experts.gate_up_proj)")
    for m, p in found:
        ndim = getattr(model.get_submodule(m), p).ndim
        if ndim not in (2, 3):
            raise LorafitError(f"lora target_parameters: {m}.{p} has {ndim} dimensions; a parameter target must be "
                               "2-D (a weight) or 3-D (stacked experts), as in PEFT")
    return found


def apply_lora(model: nn.Module, config: LoraConfig, adapter_dtype: torch.dtype = torch.float32,
               options: RuntimeOptions | None = None) -> nn.Module:
    """Wrap the targets of ``config`` in ``model`` (in place), freeze everything else, and return ``model``.
    ``options``: how the layers' kernels run (default: resolved from the environment, once, here)."""
    if getattr(model, "lora_config", None) is not None:
        raise LorafitError("this model already has a LoRA adapter; merge_and_unload it before adding another")
    options = options or RuntimeOptions.resolve()
    names = find_targets(model, config) if config.target_modules else []
    params = find_parameter_targets(model, config)
    layer_targets = set(names)
    both = next((f"{m}.{p}" for m, p in params if m in layer_targets), None)
    if both:  # checked before anything is wrapped
        raise LorafitError(f"lora target_parameters selects {both}, a parameter of a layer target_modules also "
                           "targets; adapt the layer one way (PEFT refuses it too)")
    for p in model.parameters():
        p.requires_grad_(False)
    tied = tied_with_input_embeddings(model)
    for name in names:
        base = model.get_submodule(name)
        if isinstance(base, nn.Embedding):
            if config.use_dora or config.init == "pissa":
                raise LorafitError(f"lora target {name!r} is an embedding: DoRA and PiSSA are for linear layers "
                                   "here; use plain LoRA for it (or leave it out of lora_target_modules)")
            model.set_submodule(name, LoraEmbedding(base, r=config.rank_for(name), alpha=config.alpha_for(name),
                                                      use_rslora=config.use_rslora, adapter_dtype=adapter_dtype))
            continue
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
        model.set_submodule(name, layer)
    for path, pname in params:  # after the layers: a parameter's module is no layer target
        key = f"{path}.{pname}"
        model.set_submodule(path, LoraParameter(model.get_submodule(path), pname, r=config.rank_for(key),
                                                  alpha=config.alpha_for(key), use_rslora=config.use_rslora,
                                                  adapter_dtype=adapter_dtype))
    _mark_bias_trainable(model, config.bias)
    for name in config.modules_to_save or []:
        found = [(n, m) for n, m in model.named_modules() if n == name or n.endswith("." + name)]
        if not found:
            raise LorafitError(f"lora modules_to_save entry {name!r} matches no module in this model")
        for path, m in found:
            _untie(model, path, m)
            m.requires_grad_(True)
    if tied and _names_embedding(config):
        warnings.warn(TIED_WARNING, UserWarning, stacklevel=2)  # where PEFT warns (issue huggingface/peft#2777)
    model.lora_config = config
    return model


def tied_with_input_embeddings(model: nn.Module) -> list[str]:
    """Dotted names of the modules (other than the input embeddings) that hold the input embeddings' weight
    tensor itself: the output head of a model with ``tie_word_embeddings``."""
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    if emb is None or getattr(emb, "weight", None) is None:
        return []
    return [n for n, m in model.named_modules()
            if m is not emb and getattr(m, "weight", None) is emb.weight and not n.endswith(".base_layer")]


def _names_embedding(config: LoraConfig) -> bool:
    """PEFT's test (``_check_tied_modules``): an embedding-layer name among the targets or modules_to_save."""
    saved = [m.split(".")[-1] for m in config.modules_to_save or []]
    if isinstance(config.target_modules, str):
        in_targets = config.target_modules != ALL_LINEAR and any(
            targets_rule.name_matches(e, config.target_modules) for e in EMBEDDING_LAYER_NAMES)
    else:
        in_targets = any(t.split(".")[-1] in EMBEDDING_LAYER_NAMES for t in config.target_modules)
    return in_targets or any(m in EMBEDDING_LAYER_NAMES for m in saved)


def _untie(model: nn.Module, path: str, module: nn.Module) -> None:
    """A module of ``modules_to_save`` gets its own copy of any parameter it shares with a module outside it.

    PEFT trains a copy of each such module (``ModulesToSaveWrapper``), so with tied embeddings the trained head
    and the trained (or frozen) input embeddings are separate tensors from the first step on. Training the shared
    tensor in place would update both sides with the sum of their gradients: other math. One copy per shared
    tensor is enough: after it, the other holder keeps the original alone.
    """
    holders: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(p), []).append(n)
    untied = False
    for pname, p in list(module.named_parameters(recurse=True)):
        if any(not n.startswith(path + ".") for n in holders[id(p)]):
            owner_name, _, leaf = pname.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            setattr(owner, leaf, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
            untied = True
    config = getattr(model, "config", None)
    if untied and getattr(config, "tie_word_embeddings", False):
        # the model object is untied now: a saved merged or full model must keep both tensors, and loading it
        # must not tie them again
        config.tie_word_embeddings = False


def _variant(name: str, base: nn.Module, config: LoraConfig):
    """The kind of LoRA a target gets: QLoRA over a 4-bit base, LoRA over an 8-bit one, DoRA when asked, else
    plain."""
    if int8.is_int8(base.weight):
        if config.use_dora or config.init == "pissa":
            raise LorafitError(f"lora target {name!r} has an 8-bit base: DoRA and PiSSA need the dense weight; "
                               "use plain LoRA (or load the base in bf16/fp32)")
        return INT8
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
            if getattr(layer.base_layer, "bias", None) is not None:
                layer.base_layer.bias.requires_grad_(True)


def lora_layers(model: nn.Module) -> list[LoraLinear | LoraEmbedding]:
    """The model's adapter layers: LoRA linear layers and LoRA embeddings."""
    return [m for m in model.modules() if isinstance(m, ADAPTER_LAYERS)]


def named_lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear | LoraEmbedding]]:
    for name, m in model.named_modules():
        if isinstance(m, ADAPTER_LAYERS):
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
    for name, layer in named_lora_layers(model):
        if not layer.merged:
            # A LoRA head or embedding over a tied table: merging into the shared tensor would add the head's
            # update to the embeddings too (PEFT does, with the warning at apply time); here the layer gets its
            # own copy first, so the merged model computes what the adapted one did.
            _untie(model, f"{name}.base_layer", layer.base_layer)
    if safe:
        for name, layer in named_lora_layers(model):
            dense = (layer.base_layer.weight if isinstance(layer, LoraEmbedding) else layer.dense_weight()
                     if isinstance(layer, LoraParameter) else layer.variant.dense_weight(layer))
            if not layer.merged and not torch.isfinite(dense.float() + layer.delta_weight()).all():
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
    _unwrap_all(model)
    return model


def _unwrap_all(model: nn.Module) -> None:
    """Put each adapter layer's base back in its place, the deepest first (a module's parameter updates nest)."""
    for name, layer in reversed(list(named_lora_layers(model))):
        model.set_submodule(name, layer.release() if isinstance(layer, LoraParameter) else layer.base_layer)
    model.lora_config = None


def unload(model: nn.Module) -> nn.Module:
    """Remove the adapters without merging: the original base model is back."""
    unmerge(model)
    _unwrap_all(model)
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Within the block the model computes as its base (merged adapters are unmerged and re-merged after). Blocks
    nest: each leaves the layers as it found them (a DPO reference pass inside ``lorafit eval``'s base column)."""
    layers = _require_lora(model)
    was = [(layer.merged, layer.disabled) for layer in layers]
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, (merged, disabled) in zip(layers, was, strict=True):
            layer.disabled = disabled
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
    from lorafit.kernels.experts import expert_numels

    seen, trainable, total, experts = set(), 0, 0, expert_numels(model)
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = experts.get(id(p)) or _logical_numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    return ParameterCount(trainable, total)


def _logical_numel(p) -> int:
    """Elements of the weight a parameter stands for: a 4-bit one packs two (or more) per stored element, and its
    quantization state knows the real shape (PEFT counts it the same way)."""
    state = getattr(p, "quant_state", None)
    shape = getattr(state, "shape", None)
    return math.prod(shape) if shape is not None else p.numel()
