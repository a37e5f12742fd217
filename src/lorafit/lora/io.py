"""Adapters on disk in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are PEFT's: ``base_model.model.<module path>.lora_A.weight`` (the adapter name is not stored;
embeddings: ``<path>.lora_embedding_A`` / ``lora_embedding_B``, plus the targeted embedding or head's
``<path>.base_layer.weight`` as PEFT writes it), a variant's own tensors (DoRA: ``base_model.model.<module path>.lora_magnitude_vector``, no ``.weight``), plus
``base_model.model.<path>.weight`` for ``modules_to_save`` and trainable biases. Files are written to a
temporary name and renamed into place, so a crash never leaves a half-written adapter.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorafit.errors import LorafitError
from lorafit.fsutil import follow_umask
from lorafit.lora.config import ALL_LINEAR, LoraConfig
from lorafit.lora.inject import EMBEDDING_LAYER_NAMES, apply_lora, named_lora_layers
from lorafit.lora.parameter import LoraParameter

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds, under PEFT's key names.

    PiSSA adapters are stored as plain LoRA relative to the *original* base weights (PEFT's
    ``path_initial_model_for_weight_conversion``): rank 2r, ``[A; A0]`` and ``[B, -B0]``.
    """
    state = {}
    for name, layer in named_lora_layers(model):
        for key, t in layer.adapter_tensors().items():
            state[f"{PREFIX}{name}.{key}"] = t.detach()
        init = getattr(layer, "pissa_init", None)
        if init is not None:
            a, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
            state[f"{PREFIX}{name}.lora_A.weight"] = torch.cat([a, init[0]], 0)
            state[f"{PREFIX}{name}.lora_B.weight"] = torch.cat([b, -init[1]], 1)
    state.update(_embedding_base_weights(model))
    for pname, p in model.named_parameters():
        if p.requires_grad and PREFIX + pname not in state and ".lora_A." not in pname and ".lora_B." not in pname:
            state[PREFIX + pname] = p.detach()  # modules_to_save and trainable biases, under PEFT's names
    out, seen = {}, set()
    for k, v in state.items():
        # FSDP2 shards are DTensors: each is gathered whole (every rank calls this, in the same order of keys)
        v = _whole(v).contiguous().cpu()
        if v.data_ptr() in seen:  # a tied head's base weight is the embeddings' tensor: safetensors wants a copy
            v = v.clone()
        seen.add(v.data_ptr())
        out[k] = v
    return out


def _embedding_base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's ``save_embedding_layers="auto"``: when ``target_modules`` names ``embed_tokens`` or ``lm_head`` (a
    list holding the name, or a regex matching a module so named), PEFT's file also holds the base weights of
    the wrapped input embeddings / output head (``<path>.base_layer.weight``), so an adapter trained on a
    resized vocabulary carries its table. Written by the same rule here; loading copies them back."""
    config = getattr(model, "lora_config", None)
    targets = config.target_modules if config is not None else ALL_LINEAR
    if isinstance(targets, str):
        named = targets != ALL_LINEAR and any(re.fullmatch(targets, n) for n, _ in model.named_modules()
                                              if n.split(".")[-1] in EMBEDDING_LAYER_NAMES)
    else:
        named = any(e in targets for e in EMBEDDING_LAYER_NAMES)
    if not named:
        return {}
    layers = [getattr(model, f, lambda: None)() for f in ("get_input_embeddings", "get_output_embeddings")]
    state = {}
    for name, module in named_lora_layers(model):
        if any(module is m for m in layers if m is not None):
            for pname, p in module.base_layer.named_parameters(recurse=False):
                state[f"{PREFIX}{name}.base_layer.{pname}"] = p.detach()
    return state


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        follow_umask(tmp)  # mkstemp makes it owner-only; the adapter file gets the mode a plain write would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model: str | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the model's adapter to ``directory`` in PEFT's format (atomically, file by file). ``state``: its
    :func:`adapter_state_dict` if already taken (a sharded model's, gathered on every rank)."""
    config = getattr(model, "lora_config", None)
    if config is None:
        raise LorafitError("this model has no LoRA adapter to save")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(model) if state is None else state
    targets = sorted({n.split(".")[-1] for n, layer in named_lora_layers(model) if not isinstance(layer, LoraParameter)})
    peft_config = config.to_peft_dict(targets, base_model=base_model)
    peft_config["fan_in_fan_out"] = any(layer.fan_in_fan_out for _, layer in named_lora_layers(model))
    if config.init == "pissa":
        # Stored as converted plain LoRA of rank 2r with the same scaling (see adapter_state_dict).
        peft_config.update(init_lora_weights=True, r=2 * config.r,
                           lora_alpha=config.alpha * (2**0.5 if config.use_rslora else 2))
        peft_config["rank_pattern"] = {k: 2 * v for k, v in config.rank_pattern.items()}
        peft_config["alpha_pattern"] = {k: v * (2**0.5 if config.use_rslora else 2) for k, v in config.alpha_pattern.items()}
    _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, p, metadata={"format": "pt"}))
    _atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(peft_config, indent=2) + "\n"))
    return directory


def read_adapter_config(directory: str | os.PathLike) -> LoraConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise LorafitError(f"{path}: not found; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise LorafitError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LorafitError(f"{path}: cannot read it as UTF-8 JSON ({e})") from None
    if not isinstance(data, dict):
        raise LorafitError(f"{path}: must be a JSON object (PEFT's LoraConfig), got a {type(data).__name__}")
    return LoraConfig.from_peft_dict(data, source=str(path))


def read_adapter_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    directory = Path(directory)
    path = directory / WEIGHTS_NAME
    if path.is_file():
        try:
            return load_file(path)
        except (SafetensorError, OSError) as e:
            raise LorafitError(f"{path}: cannot read safetensors file ({e})") from None
    legacy = directory / "adapter_model.bin"
    if legacy.is_file():
        # weights_only: never unpickle arbitrary objects from a downloaded adapter.
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise LorafitError(f"{path}: not found; is {directory} an adapter folder?")


def load_adapter(model: nn.Module, directory: str | os.PathLike, trainable: bool = False) -> nn.Module:
    """Attach the adapter saved in ``directory`` (lorafit's or PEFT's) to ``model`` and return it.

    Checks that every tensor in the file has a place in the model with the same shape, and that every wrapped
    layer gets its weights; otherwise says what differs (usually: the adapter belongs to another base model).
    """
    config = read_adapter_config(directory)
    state = read_adapter_weights(directory)
    try:
        config.init = "kaiming"
        apply_lora(model, config)
    except LorafitError as e:
        raise LorafitError(f"adapter {directory} does not fit this model: {e}") from None
    copy_adapter_weights(model, state, f"adapter {directory}")
    if not trainable:
        model.requires_grad_(False)
    return model


def copy_adapter_weights(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy PEFT-named tensors into a model that already has its LoRA layers, after checking they fit.

    Every tensor must have a place of the same shape, and every LoRA layer must get its A and B (DoRA: and its
    magnitude); otherwise the error says which tensor differs (``where`` names the file in the message).
    """
    # remove_duplicate=False: a tied head and its input embeddings are both named (PEFT's files name both)
    own = {f"{PREFIX}{n}": p for n, p in model.named_parameters(remove_duplicate=False)}
    for name, _ in named_lora_layers(model):  # older files name wrapped layers' biases without ".base_layer"
        for suffix in ("bias", "weight"):
            if f"{PREFIX}{name}.base_layer.{suffix}" in own:
                own.setdefault(f"{PREFIX}{name}.{suffix}", own[f"{PREFIX}{name}.base_layer.{suffix}"])
    unknown = [k for k in state if k not in own]
    if unknown:
        raise LorafitError(
            f"{where}: {len(unknown)} tensors have no place in this model (first: {unknown[0]}); "
            "it was trained on a different base model"
        )
    for key, tensor in state.items():
        if tuple(own[key].shape) != tuple(tensor.shape):
            raise LorafitError(
                f"{where}: {key} has shape {tuple(tensor.shape)} but the model expects "
                f"{tuple(own[key].shape)}; it was trained on a different base model (or r differs)"
            )
    needed = [f"{PREFIX}{n}.{key}" for n, layer in named_lora_layers(model) for key in layer.adapter_tensors()]
    missing = [k for k in needed if k not in state]
    if missing:
        raise LorafitError(f"{where}: no weights for {missing[0]} (and {len(missing) - 1} more)")
    with torch.no_grad():
        for key, tensor in state.items():
            target = own[key]
            if hasattr(target, "device_mesh"):  # an FSDP2 shard: this rank's part of the whole tensor
                from torch.distributed.tensor import distribute_tensor

                tensor = distribute_tensor(tensor.to(target.dtype), target.device_mesh, target.placements)
            target.copy_(tensor.to(target.dtype))
