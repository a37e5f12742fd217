"""The estimator's :class:`~lorafit.memory.estimate.Settings` for a training config: the one translation.

``lorafit estimate --config``, ``lorafit measure`` and the benchmarks build their settings here, so a config
is estimated with the choices training makes from it. Imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorafit.memory.estimate import Settings
from lorafit.options import RuntimeOptions

if TYPE_CHECKING:
    from lorafit.config import TrainConfig


def settings_from_config(cfg: TrainConfig, device: str, runtime: RuntimeOptions | None = None,
                         nproc: int = 1) -> Settings:
    """Settings of one training step of ``cfg`` on ``device`` ("cuda" or "cpu"). ``bf16: auto`` is bfloat16 on
    a GPU target (the estimate is for one that has it) and float32 on a CPU, as training decides it; the
    kernels' options are the config's (the environment as a fallback) unless ``runtime`` is given. ``nproc``:
    the ranks torchrun starts; then the settings are one rank's, FSDP2 when the config sets axolotl's fsdp keys
    (``fsdp_version: 2`` / ``fsdp:`` / ``fsdp_config:``), DDP otherwise. DPO and ORPO run a micro-batch of N
    pairs as 2N sequences (chosen and rejected in one forward): the settings count 2N rows (KTO's KL rows run
    without autograd: N)."""
    rows = 2 if getattr(cfg, "rl", None) in ("dpo", "orpo") else 1
    kw = dict(method="lora" if cfg.is_lora else "full", dtype=cfg.dtype_for(device == "cuda"),
              micro_batch=rows * (1 if cfg.micro_batch_size == "auto" else cfg.micro_batch_size),
              seq_len=cfg.sequence_len,
              gradient_checkpointing=bool(cfg.gradient_checkpointing),
              offload_checkpoints=cfg.gradient_checkpointing == "offload", packing=bool(cfg.sample_packing),
              optimizer=cfg.optimizer, loss_chunk_tokens=cfg.loss_chunk_tokens, nproc=nproc,
              fsdp=bool(cfg.fsdp_enabled) and nproc > 1,  # one process is never sharded
              rl=getattr(cfg, "rl", None))
    if cfg.is_lora:
        kw.update(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets,
                  layers_to_transform=cfg.lora_layers_to_transform, use_dora=bool(cfg.peft_use_dora),
                  rank_pattern=dict(cfg.lora_rank_pattern or {}), modules_to_save=cfg.lora_modules_to_save)
    if cfg.four_bit:
        kw.update(four_bit=cfg.four_bit["quant_type"], double_quant=cfg.four_bit["double_quant"])
    if cfg.load_in_8bit:
        kw.update(eight_bit=True)
    return Settings(**kw, device=device, runtime=runtime or cfg.runtime_options())
