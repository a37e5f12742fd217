"""Setting a run up: seeds, the LoRA config from the YAML, and what training does to a loaded model."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

from lorafit.lora import LoraConfig, apply_lora
from lorafit.models import apply_special_tokens, load_model_and_tokenizer, train_dtype
from lorafit.options import RuntimeOptions
from lorafit.patches import apply_lean_kernels


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
    )


def make_trainable(model: nn.Module, lora: LoraConfig | None, gradient_checkpointing: bool,
                   options: RuntimeOptions) -> nn.Module:
    """What training does to a loaded model: the adapter (or every weight unfrozen), the lean kernels of its
    family (``model.lean_kernels`` is the handle: what was switched, and ``restore()``), checkpointing, no cache.

    Shared with ``lorafit.measure``, so the measured step is the trainer's own.
    """
    if lora is not None:
        apply_lora(model, lora, options=options)
    else:
        model.requires_grad_(True)
    apply_lean_kernels(model, options=options)
    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, so it works with a frozen embedding.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    return model


def prepare_model(cfg, options: RuntimeOptions | None = None):
    """Load the base model and tokenizer of ``cfg`` and make it trainable (adapter or full fine-tuning)."""
    options = options or cfg.runtime_options()
    use_tf32(cfg.tf32)
    model, tokenizer = load_model_and_tokenizer(cfg.base_model, train_dtype(cfg), tokenizer=cfg.tokenizer_config,
                                                base_dir=cfg.config_dir,
                                                attn_implementation=cfg.attn_implementation or "sdpa")
    apply_special_tokens(tokenizer, cfg.special_tokens, model, trains_embeddings=cfg.trains_embeddings)
    make_trainable(model, lora_config_from(cfg) if cfg.is_lora else None, cfg.gradient_checkpointing, options)
    return model, tokenizer
