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
from lorafit.lora import adapter_state_dict, read_adapter_weights, save_adapter
from lorafit.lora.io import copy_adapter_weights
from lorafit.train.distributed import World, barrier, gather_objects
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


def _optimizer_state(optimizer, world: World, loss_module) -> dict:
    """The optimizer's state as one process would hold it (FSDP2: gathered whole from the shards, on the host)."""
    if not world.fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(loss_module, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_optimizer_state(optimizer, saved: dict, world: World, loss_module) -> None:
    if not world.fsdp:
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(loss_module, optimizer, saved, options=StateDictOptions(full_state_dict=True))


def save_checkpoint(output_dir: Path, model: nn.Module, optimizer, scheduler, state: TrainState,
                    config_dump: dict, keep: int | None = None, fingerprint: dict | None = None,
                    world: World | None = None, loss_module=None, scaler=None) -> Path:
    """Write ``output_dir/checkpoint-<step>``; its ``state.json`` holds the data position, the config, and the
    config's fingerprint (:mod:`lorafit.train.run_record`), which a resume compares with its own.

    Under torchrun every rank calls this: the adapter (whole, FSDP2's shards gathered; the frozen base is not)
    and every rank's RNG states are collected, and rank 0 writes the folder while the others wait.
    ``loss_module``: the FSDP2 root, for its optimizer state. ``scaler``: fp16's loss scaler, whose scale and
    growth tracker are saved so a resumed run scales (and skips) as an uninterrupted one.
    """
    world = world or World()
    final = output_dir / f"checkpoint-{state.step}"
    lora = getattr(model, "lora_config", None) is not None
    adapter = adapter_state_dict(model) if lora else None
    optim_state = _optimizer_state(optimizer, world, loss_module)
    rngs = gather_objects(world, rng_state())
    if not world.is_main:
        barrier(world)
        return final
    with atomic_dir(final) as tmp:
        if lora:
            save_adapter(model, tmp, base_model=config_dump.get("base_model"), state=adapter)
        else:
            save_model(model, str(tmp / "model.safetensors"))  # handles tied weights
        torch.save(
            {"optimizer": optim_state, "scheduler": scheduler.state_dict(), "rng": rngs[0],
             **({"rng_ranks": rngs} if world.distributed else {}),
             **({"scaler": scaler.state_dict()} if scaler is not None else {})},
            tmp / "trainer_state.pt",
        )
        meta = {**asdict(state), "config": config_dump, "fingerprint": fingerprint}
        (tmp / "state.json").write_text(json.dumps(meta, indent=2))
    if keep:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(world)
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


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, world: World | None = None,
                    loss_module=None, scaler=None) -> TrainState:
    """Restore everything :func:`save_checkpoint` wrote into the live objects; returns the train state.

    Every rank reads the folder (the optimizer state onto the host first); each takes its own RNG states. A
    checkpoint of another world size cannot resume exactly (the data order per rank differs): refused.
    """
    world = world or World()
    meta = read_state(path)
    try:
        trainer_state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise LorafitError(f"checkpoint {path} is unreadable ({e}); delete it to resume from an earlier one") from None
    ranks = trainer_state.get("rng_ranks") or [trainer_state["rng"]]
    if len(ranks) != world.world_size:  # each rank's data order and RNG are those of its world size
        raise LorafitError(f"checkpoint {path} was written by {len(ranks)} process(es), this run has "
                           f"{world.world_size}; resume with --nproc {len(ranks)} (or start a new run)")
    if getattr(model, "lora_config", None) is not None:
        copy_adapter_weights(model, read_adapter_weights(path), f"checkpoint {path}")
    else:
        missing, unexpected = model.load_state_dict(load_file(path / "model.safetensors"), strict=False)
        if unexpected:
            raise LorafitError(f"checkpoint {path} does not match the model (unexpected {unexpected[0]})")
    _load_optimizer_state(optimizer, trainer_state["optimizer"], world, loss_module)
    use_fused(optimizer)
    scheduler.load_state_dict(trainer_state["scheduler"])
    if scaler is not None and "scaler" in trainer_state:  # absent: a checkpoint of a run that was not fp16
        scaler.load_state_dict(trainer_state["scaler"])
    set_rng_state(ranks[world.rank])
    fields = {k: meta[k] for k in TrainState.__dataclass_fields__ if k in meta}
    return TrainState(**fields)
