"""``micro_batch_size: auto``: the largest micro-batch whose estimated peak fits the device, keeping the batch.

The estimator (:mod:`lorafit.memory`) answers for each micro-batch that divides ``batch_size`` (the samples per
optimizer step), largest first; the first that fits the budget, less a safety margin, is taken, and
``gradient_accumulation_steps`` makes up the rest. The budget is ``max_memory`` when the config sets it, else
what the device has free: CUDA's free memory, or the memory the OS reports available on a CPU.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from lorafit.errors import LorafitError
from lorafit.memory.catalog import parse_size
from lorafit.memory.estimate import GiB, estimate
from lorafit.memory.settings import settings_from_config
from lorafit.memory.spec import resolve_spec

MARGIN = 0.10  # the estimator's error on measured rows is within ±5%; keep twice that free


def resolve_auto_batch(cfg, dtype: str) -> str | None:
    """Replace ``auto`` in ``cfg``'s batch keys by numbers; returns the line that tells the user what was chosen."""
    micro, accum = cfg.micro_batch_size, cfg.gradient_accumulation_steps
    if micro != "auto" and accum != "auto":
        return None
    total = cfg.batch_size
    if micro != "auto":  # only the accumulation is left to fill the batch
        cfg.gradient_accumulation_steps = total // micro
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    budget, where = memory_budget(cfg.max_memory, device)
    try:
        spec = resolve_spec(cfg.base_model_path)
    except LorafitError as e:  # a model the estimate cannot model (a mixture of experts): no batch to choose
        raise LorafitError(f"micro_batch_size auto: {e}; set micro_batch_size to a number") from None
    usable = int(budget * (1 - MARGIN))
    peak = None
    smallest = 2 if cfg.rl == "kto" else 1  # KTO's KL estimate pairs each row with another of its micro-batch
    for m in sorted((d for d in range(smallest, total + 1) if total % d == 0), reverse=True):
        cfg.micro_batch_size, cfg.gradient_accumulation_steps = m, total // m
        peak = estimate(spec, _settings(cfg, device, dtype)).total
        if peak <= usable:
            return (f"micro_batch_size auto: {m} × {total // m} accumulation steps (estimated peak "
                    f"{peak / GiB:.2f} GiB of {budget / GiB:.2f} GiB {where}, {MARGIN:.0%} kept free)")
    if peak is None:
        raise LorafitError(f"micro_batch_size auto with rl: kto needs batch_size 2 or more (got {total}); KTO "
                           "estimates its KL term from the other rows of a micro-batch")
    raise LorafitError(f"micro_batch_size auto: even {smallest} sample(s) need about {peak / GiB:.2f} GiB, more than "
                       f"{usable / GiB:.2f} GiB of {where}; shorten sequence_len, set gradient_checkpointing: "
                       "true, or use a smaller model")


def _settings(cfg, device: str, dtype: str):
    # under torchrun, one rank's share (DDP's replica and buckets, or FSDP2's shards)
    nproc = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return replace(settings_from_config(cfg, device, nproc=nproc), dtype=dtype)


def memory_budget(max_memory, device: str) -> tuple[int, str]:
    """Bytes ``auto`` may plan for, and where they come from (for the message)."""
    if isinstance(max_memory, dict):  # axolotl's per-device form: {0: 20GiB, cpu: 64GiB}
        key = next((k for k in max_memory if str(k) == ("0" if device == "cuda" else "cpu")), None)
        max_memory = max_memory.get(key) if key is not None else None
    if max_memory is not None:
        return parse_size(str(max_memory), "max_memory"), "max_memory"
    if device == "cuda":
        return torch.cuda.mem_get_info()[0], "free GPU memory"
    return _available_ram(), "available memory"


def _available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise LorafitError("micro_batch_size auto: cannot read the free memory here; set max_memory (e.g. 16GiB)")
