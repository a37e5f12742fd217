"""Setting a run up: seeds, the LoRA config from the YAML, and what training does to a loaded model."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

from lorafit.errors import LorafitError
from lorafit.kernels.experts import recompute_in_backward
from lorafit.lora import LoraConfig, apply_lora
from lorafit.lora.inject import named_lora_layers
from lorafit.lora.io import PREFIX, copy_adapter_weights, read_adapter_config, read_adapter_weights
from lorafit.models import apply_special_tokens, load_model_and_tokenizer, train_dtype
from lorafit.options import RuntimeOptions
from lorafit.patches import apply_lean_kernels
from lorafit.train.freeze import freeze_except


def use_tf32(enabled: bool | None) -> None:
    """The config's ``tf32``: TF32 matmuls and convolutions on CUDA (None leaves torch's default; CPU unaffected)."""
    if enabled is not None:
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lora_config_from(cfg) -> LoraConfig:
    """The adapter a :class:`~lorafit.config.TrainConfig` asks for."""
    return LoraConfig(
        r=cfg.lora_r,
        alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout,
        target_modules=cfg.lora_targets,
        use_rslora=cfg.peft_use_rslora,
        use_dora=cfg.peft_use_dora,
        init=cfg.lora_init,
        modules_to_save=cfg.lora_modules_to_save,
        layers_to_transform=cfg.lora_layers_to_transform,
        rank_pattern=dict(cfg.lora_rank_pattern or {}),
        alpha_pattern=dict(cfg.lora_alpha_pattern or {}),
        target_parameters=cfg.lora_target_parameters,
    )


def has_accelerator() -> bool:
    """Whether this machine has a CUDA-like device (transformers' offload pins host memory for it)."""
    return torch.cuda.is_available() or getattr(torch, "accelerator", None) is not None and \
        torch.accelerator.current_accelerator() is not None


def make_trainable(model: nn.Module, lora: LoraConfig | None, gradient_checkpointing: bool | str,
                   options: RuntimeOptions, unfrozen: list[str] | None = None) -> nn.Module:
    """What training does to a loaded model: the adapter (or, for full fine-tuning, every weight unfrozen, or those
    ``unfrozen`` selects), the lean kernels of its family (``model.lean_kernels`` is the handle: what was switched,
    and ``restore()``), checkpointing, no cache.

    Shared with ``lorafit.measure``, so the measured step is the trainer's own.
    """
    if lora is not None:
        apply_lora(model, lora, options=options)
    elif unfrozen:
        freeze_except(model, unfrozen)
    else:
        model.requires_grad_(True)
    apply_lean_kernels(model, options=options)
    if gradient_checkpointing == "offload" and has_accelerator():
        # transformers' offload: each checkpoint's saved input goes to pinned host memory through torch's
        # save_on_cpu and comes back for the recompute. Without an accelerator the activations are in host
        # memory already (and pinned memory does not exist): plain checkpointing, as the config's notice says.
        if not hasattr(model, "activation_checkpointing_enable"):
            raise LorafitError("gradient_checkpointing: offload needs transformers' activation_checkpointing_enable"
                               " (transformers 5); upgrade transformers or set gradient_checkpointing: true")
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False}, offload=True)
    elif gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, so it works with a frozen embedding.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if gradient_checkpointing:
        _no_embedding_output_grad(model)
    else:  # checkpointing keeps one layer's dense experts at a time; without it, only their inputs are kept
        recompute_in_backward(model)
    model.config.use_cache = False
    model.train()
    return model


def _no_embedding_output_grad(model: nn.Module) -> None:
    """Undo the hook transformers' checkpointing puts on the input embeddings to make their output require grad.

    Reentrant checkpointing needs it; lorafit's is non-reentrant. With a frozen embedding that gradient is thrown
    away, and asking for it makes the first block's q/k/v backward compute ``dx`` (and, over a 4-bit base,
    dequantize three weights) for nothing. A trainable embedding (full fine-tuning, LoRA or modules_to_save on
    it) makes its output require grad by itself.
    """
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()


# flash attention's implementations in transformers, and its check that the package and a CUDA device are there
FLASH_ATTENTION = {"flash_attention_2": "is_flash_attn_2_available", "flash_attention_3": "is_flash_attn_3_available"}


def attention_choice(requested: str | None) -> tuple[str, str | None]:
    """The attention implementation to load with, and a notice when the config's cannot run here: flash attention
    without its package or a CUDA device runs as sdpa, the same exact attention (lorafit downloads no kernels)."""
    want = requested or "sdpa"
    check = FLASH_ATTENTION.get(want)
    if check is None:
        return want, None
    import transformers.utils

    if getattr(transformers.utils, check)():
        return want, None
    return "sdpa", (f"attn_implementation {want}: flash attention's package or a CUDA device is missing here; "
                    "runs as sdpa, the same exact attention")


def prepare_model(cfg, options: RuntimeOptions | None = None):
    """Load the base model and tokenizer of ``cfg`` and make it trainable (adapter or full fine-tuning)."""
    options = options or cfg.runtime_options()
    use_tf32(cfg.tf32)
    lora = lora_config_from(cfg) if cfg.is_lora else None
    start = cfg.resolve_path(cfg.lora_model_dir) if lora is not None and cfg.lora_model_dir else None
    if start is not None:
        check_start_adapter(start, lora, cfg.source)  # before the base loads: a mismatch is refused at once
    attention, notice = attention_choice(cfg.attn_implementation)
    model, tokenizer = load_model_and_tokenizer(cfg.base_model, train_dtype(cfg), tokenizer=cfg.tokenizer_config,
                                                base_dir=cfg.config_dir, attn_implementation=attention,
                                                four_bit=cfg.four_bit, eight_bit=cfg.load_in_8bit,
                                                moe_experts=cfg.quantize_moe_experts,
                                                linearized_experts=cfg.llama4_linearized_experts)
    # printed by the recipe with its other notes (the loader's own, when the model has no sdpa path, comes first)
    model.attention_notice = "; ".join(n for n in (getattr(model, "attention_notice", None), notice) if n) or None
    apply_special_tokens(tokenizer, cfg.special_tokens, model, trains_embeddings=cfg.trains_embeddings)
    make_trainable(model, lora, cfg.gradient_checkpointing, options, unfrozen=cfg.unfrozen_parameters)
    if start is not None:
        load_start_adapter(model, start, cfg.source)
    return model, tokenizer


def check_start_adapter(directory, lora: LoraConfig, source: str) -> None:
    """``lora_model_dir``: the saved adapter's settings must be the config's (r, alpha, rsLoRA, DoRA, layers,
    the parameter targets, and the module targets when both are lists of names); otherwise one line says what
    differs."""
    saved = read_adapter_config(directory)
    pairs = [("lora_r", saved.r, lora.r), ("lora_alpha", float(saved.alpha), float(lora.alpha)),
             ("peft_use_rslora", saved.use_rslora, lora.use_rslora), ("peft_use_dora", saved.use_dora, lora.use_dora),
             ("lora_layers_to_transform", saved.layers_to_transform, lora.layers_to_transform),
             ("lora_modules_to_save", sorted(saved.modules_to_save or []), sorted(lora.modules_to_save or []))]
    if isinstance(saved.target_modules, list) and isinstance(lora.target_modules, list):
        pairs.append(("lora_target_modules", sorted(saved.target_modules), sorted(lora.target_modules)))
    pairs += [("lora_target_parameters", sorted(saved.target_parameters or []), sorted(lora.target_parameters or [])),
              ("lora_rank_pattern", saved.rank_pattern or {}, lora.rank_pattern or {}),
              ("lora_alpha_pattern", saved.alpha_pattern or {}, lora.alpha_pattern or {})]
    diffs = [f"{key} {a} in the adapter, {b} in the config" for key, a, b in pairs if a != b]
    if diffs:
        raise LorafitError(f"{source}: lora_model_dir {directory}: the adapter does not match this config's LoRA "
                           f"settings: {'; '.join(diffs)}")


def load_start_adapter(model: nn.Module, directory, source: str) -> None:
    """Copy the saved adapter's weights into the freshly applied one; its layers must be the config's."""
    state = read_adapter_weights(directory)
    saved = {k.removeprefix(PREFIX).rpartition(".lora_")[0] for k in state
             if k.endswith((".lora_A.weight", ".lora_embedding_A"))}
    ours = {name for name, _ in named_lora_layers(model)}
    if saved != ours:
        only = sorted(saved - ours) or sorted(ours - saved)
        side = "the adapter" if saved - ours else "the config"
        raise LorafitError(f"{source}: lora_model_dir {directory}: the adapter's target layers are not the config's "
                           f"({len(saved)} in the adapter, {len(ours)} here; only {side} has {only[0]}); "
                           "set lora_target_modules to the adapter's targets")
    copy_adapter_weights(model, state, f"{source}: lora_model_dir {directory}")
