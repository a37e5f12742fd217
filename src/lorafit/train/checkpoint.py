"""Checkpoints that resume exactly: weights, optimizer, scheduler, RNG states and the data position.

A checkpoint is a folder ``output_dir/checkpoint-<step>`` built under a temporary name and renamed into place
(:func:`lorafit.fsutil.atomic_dir`), so a crash (even SIGKILL) never leaves a folder that resume would take for complete.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_model
from torch import nn

from lorafit.errors import LorafitError
from lorafit.fsutil import atomic_dir
from lorafit.lora import read_adapter_weights, save_adapter
from lorafit.lora.io import copy_adapter_weights
from lorafit.train.optim import use_fused

_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainState:
    """Where training is: optimizer steps done, and the next micro-batch to read."""

    step: int = 0
    epoch: int = 0
    batch_index: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": json.dumps(random.getstate()),
        "numpy": json.dumps(np.random.get_state()[1].tolist()),
        "numpy_pos": int(np.random.get_state()[2]),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(("MT19937", np.array(json.loads(state["numpy"]), dtype=np.uint32), state["numpy_pos"], 0, 0.0))


def save_checkpoint(output_dir: Path, model: nn.Module, optimizer, scheduler, state: TrainState,
                    config_dump: dict, keep: int | None = None, fingerprint: dict | None = None) -> Path:
    """Write ``output_dir/checkpoint-<step>``; its ``state.json`` holds the data position, the config, and the
    config's fingerprint (:mod:`lorafit.train.run_record`), which a resume compares with its own."""
    final = output_dir / f"checkpoint-{state.step}"
    with atomic_dir(final) as tmp:
        if getattr(model, "lora_config", None) is not None:
            save_adapter(model, tmp, base_model=config_dump.get("base_model"))
        else:
            save_model(model, str(tmp / "model.safetensors"))  # handles tied weights
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
            tmp / "trainer_state.pt",
        )
        meta = {**asdict(state), "config": config_dump, "fingerprint": fingerprint}
        (tmp / "state.json").write_text(json.dumps(meta, indent=2))
    if keep:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def is_checkpoint_name(name: str) -> bool:
    return _NAME.match(name) is not None


def read_state(path: Path) -> dict:
    """The checkpoint's ``state.json`` (train state, config, fingerprint); a one-line error when unreadable."""
    try:
        meta = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise LorafitError(f"checkpoint {path} is unreadable ({e}); delete it to resume from an earlier one") from None
    if not isinstance(meta, dict):
        raise LorafitError(f"checkpoint {path}: state.json is not a JSON object; delete it to resume from an earlier one")
    return meta


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted save are ignored)."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _NAME.match(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler) -> TrainState:
    """Restore everything :func:`save_checkpoint` wrote into the live objects; returns the train state."""
    meta = read_state(path)
    try:
        trainer_state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise LorafitError(f"checkpoint {path} is unreadable ({e}); delete it to resume from an earlier one") from None
    if getattr(model, "lora_config", None) is not None:
        copy_adapter_weights(model, read_adapter_weights(path), f"checkpoint {path}")
    else:
        missing, unexpected = model.load_state_dict(load_file(path / "model.safetensors"), strict=False)
        if unexpected:
            raise LorafitError(f"checkpoint {path} does not match the model (unexpected {unexpected[0]})")
    optimizer.load_state_dict(trainer_state["optimizer"])
    use_fused(optimizer)
    scheduler.load_state_dict(trainer_state["scheduler"])
    set_rng_state(trainer_state["rng"])
    fields = {k: meta[k] for k in TrainState.__dataclass_fields__ if k in meta}
    return TrainState(**fields)
