"""Which config made what an output folder holds, and what a new run may replace there.

``lorafit train`` writes ``output_dir/lorafit-run.json`` holding its config's *fingerprint*: the keys that decide
what the weights and the data position mean (:data:`FINGERPRINT_KEYS`), plus a content hash of each dataset's
files. Checkpoints store the same fingerprint. Before anything loads, :func:`plan_output` compares the folder
(or the checkpoint a resume starts from) with the new run and either refuses in one line, having changed
nothing, or returns what to remove; :func:`prepare_output` then does it. Only what lorafit writes there
(:data:`OUTPUTS`, ``checkpoint-N`` folders, stale temporaries) is ever removed.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from lorafit.data.loading import resolve_dataset_files
from lorafit.errors import LorafitError
from lorafit.fsutil import display, listing, read_json, write_json
from lorafit.lora.io import CONFIG_NAME, WEIGHTS_NAME
from lorafit.train.checkpoint import is_checkpoint_name, latest_checkpoint, read_state

RECORD = "lorafit-run.json"

# The keys that decide what the weights and the data position mean: a run continues (or silently replaces) only
# a run with the same values. Not here, so a resume may change them: max_steps, num_epochs, the learning rate
# and its schedule, eval/save/logging steps, save_total_limit, output_dir, compile_kernels, half_matmul.
FINGERPRINT_KEYS = (
    "base_model", "tokenizer_config", "special_tokens", "chat_template", "eot_tokens", "train_on_eos",
    "default_system_message", "chat_template_kwargs", "bf16", "fp16",
    "adapter", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_linear",
    "lora_modules_to_save", "peft_use_rslora", "peft_use_dora", "lora_init", "lora_layers_to_transform",
    "lora_rank_pattern", "lora_alpha_pattern", "lora_target_parameters", "load_in_4bit", "load_in_8bit", "bnb_config_kwargs",
    "quantize_moe_experts", "llama4_linearized_experts",
    "lora_model_dir",
    "datasets", "test_datasets", "val_set_size", "sequence_len", "sample_packing", "curriculum_sampling",
    "dataset_exact_deduplication",
    "pad_to_sequence_len",
    "train_on_inputs", "micro_batch_size", "gradient_accumulation_steps", "optimizer", "seed",
    "rl",  # preference training: batches of pairs (or KTO rows), not of samples
)
DATASET_KEYS = ("datasets", "test_datasets")
DATA_HASH = "data_sha256"  # added to each dataset entry of a fingerprint: the content of its files

# What `lorafit train` writes in output_dir besides checkpoint-N folders.
OUTPUTS = frozenset({RECORD, "metrics.jsonl", "loss.png", CONFIG_NAME, WEIGHTS_NAME, "model"})
# What a run killed mid-write leaves: atomic_dir's folders, and the temporary files of lora.io and write_json.
_TEMPORARY = re.compile(r"\.tmp-(checkpoint-\d+|model)-.+"
                        rf"|\.({re.escape(CONFIG_NAME)}|{re.escape(WEIGHTS_NAME)}|{re.escape(RECORD)})(\..+)?\.tmp")


# ---- the fingerprint ------------------------------------------------------------------------------------
def fingerprint(cfg) -> dict:
    """The fingerprint of ``cfg``: its :data:`FINGERPRINT_KEYS`, each dataset with the hash of its files."""
    fp = fingerprint_of(cfg.model_dump(mode="json"))
    for key in DATASET_KEYS:
        for i, (spec, entry) in enumerate(zip(getattr(cfg, key) or [], fp.get(key) or [], strict=True)):
            entry[DATA_HASH] = data_sha256(spec, f"{key}[{i}]", cfg)
    return fp


def fingerprint_of(dump: dict) -> dict:
    """The fingerprint keys of a config dump, without data hashes (all a checkpoint of older lorafit has)."""
    return {k: dump[k] for k in FINGERPRINT_KEYS if k in dump}


def data_sha256(spec, key: str, cfg) -> str:
    """sha256 of the files the dataset entry resolves to (a saved HF folder: each file with its name)."""
    kind, target = resolve_dataset_files(spec, key, cfg)
    if kind == "hf_disk":  # cache-*.arrow files are derived, written by `datasets` when it maps
        files = sorted(p for p in target.rglob("*") if p.is_file() and not p.name.startswith("cache-"))
    else:
        files = target
    h = hashlib.sha256()
    for f in files:
        name = f.relative_to(target).as_posix() if kind == "hf_disk" else ""
        try:
            h.update(f"{name}\0{f.stat().st_size}\0".encode())
            with open(f, "rb") as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
        except OSError as e:
            raise LorafitError(f"{cfg.source}: {key}: cannot read {display(f)} ({e.strerror or e})") from None
    return h.hexdigest()


def differences(old: dict, new: dict) -> list[str]:
    """``"lora_r 16 → 8"`` for each key whose value differs. A key only one side has (written by another
    lorafit version) is skipped."""
    was, now = _flat(old), _flat(new)
    found = []
    for key, a in was.items():
        if key not in now or now[key] == a:
            continue
        if key.endswith("." + DATA_HASH):
            found.append(f"{key.removesuffix('.' + DATA_HASH)} data changed")
        else:
            found.append(_change(key, a, now[key]))
    return found


def _flat(fp: dict) -> dict:
    """Dataset lists as ``datasets`` (the count) and ``datasets[0].path`` ..., other keys as they are."""
    flat = {}
    for k, v in fp.items():
        if k in DATASET_KEYS and isinstance(v, list):
            flat[k] = f"{len(v)} {'entry' if len(v) == 1 else 'entries'}"
            for i, entry in enumerate(v):
                flat.update({f"{k}[{i}].{sk}": sv for sk, sv in (entry or {}).items()})
        else:
            flat[k] = v
    return flat


def _show(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return str(v).lower()
    return v if isinstance(v, str) else json.dumps(v)


def _change(key: str, a, b) -> str:
    a, b = _show(a), _show(b)
    return f"{key} changed" if max(len(a), len(b)) > 60 else f"{key} {a} → {b}"


def summary(diffs: list[str], sep: str = ", ", shown: int = 4) -> str:
    more = f"{sep}and {len(diffs) - shown} more" if len(diffs) > shown else ""
    return sep.join(diffs[:shown]) + more


# ---- what a run may do in its folder --------------------------------------------------------------------
@dataclass
class OutputPlan:
    """What :func:`prepare_output` does in ``folder`` before the model loads."""

    folder: Path
    remove: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    resume_from: Path | None = None  # the checkpoint to continue from


def plan_output(folder: Path, fp: dict, resume: bool, overwrite: bool, checkpoint: Path | None = None) -> OutputPlan:
    """Check ``folder`` (and, to resume, ``checkpoint`` or the folder's newest) against the fingerprint ``fp``.
    A one-line error, with nothing changed, when the run would replace another run or files lorafit did not
    write (unless ``overwrite``) or continue a checkpoint of another config; else what to do."""
    plan = OutputPlan(folder)
    entries = sorted(folder.iterdir()) if folder.is_dir() else []
    stale = [p for p in entries if _TEMPORARY.fullmatch(p.name)]
    if stale:
        plan.notes.append(f"{display(folder)}: removing {listing(p.name for p in stale)} left by an interrupted run")
        plan.remove += stale
    if resume:
        plan.resume_from = checkpoint or latest_checkpoint(folder)
        if plan.resume_from is not None:
            check_checkpoint(plan.resume_from, fp)
            if plan.resume_from.parent.resolve() == folder.resolve():
                return plan  # continuing the run that is there: nothing of it goes
        else:
            plan.notes.append(f"no complete checkpoint in {display(folder)}; starting from step 0")
    plan.remove += _replaced(folder, [p for p in entries if p not in stale], fp, overwrite, plan.notes)
    return plan


def _replaced(folder: Path, entries: list[Path], fp: dict, overwrite: bool, notes: list[str]) -> list[Path]:
    """What a new run removes from ``folder`` (lorafit's files only), or a one-line refusal."""
    ours = [p for p in entries if p.name in OUTPUTS or is_checkpoint_name(p.name)]
    others = [p for p in entries if p not in ours]
    outputs = [p for p in ours if p.name != RECORD]
    where = display(folder)
    record = read_json(folder / RECORD) or {}
    if isinstance(record.get("fingerprint"), dict):  # a lorafit run: user files beside it are never touched
        diffs = differences(record["fingerprint"], fp)
        if diffs and outputs and not overwrite:
            raise LorafitError(f"output_dir {where} holds another run ({summary(diffs)}); pass --overwrite to "
                               "replace it, or set a new output_dir")
        if outputs:
            notes.append(f"{where}: --overwrite: replacing another run ({summary(diffs)})" if diffs
                         else f"{where}: replacing the previous run of this config")
        return ours
    if not entries:
        return []
    if not overwrite:
        raise LorafitError(f"output_dir {where}: folder is not empty and holds no lorafit run "
                           f"({listing(p.name for p in entries)}); choose a new output_dir, or pass --overwrite "
                           "to train there (lorafit replaces only the files it writes)")
    removed = f"removing {listing(p.name for p in ours)}" if ours else "nothing to remove"
    kept = f"; keeping {listing(p.name for p in others)}" if others else ""
    notes.append(f"{where}: --overwrite: {removed}{kept}")
    return ours


def check_checkpoint(ckpt: Path, fp: dict) -> None:
    """A one-line error unless ``ckpt`` is a complete checkpoint made by a config with fingerprint ``fp``."""
    if not (ckpt / "state.json").is_file():
        raise LorafitError(f"resume_from_checkpoint {display(ckpt)}: not a complete checkpoint (no state.json); "
                           "give a checkpoint-N folder, or remove the key to start from step 0")
    meta = read_state(ckpt)
    made = meta.get("fingerprint") or fingerprint_of(meta.get("config") or {})
    diffs = differences(made, fp)
    if diffs:
        raise LorafitError(f"checkpoint {display(ckpt)} was made by a different config: {summary(diffs, '; ')}; "
                           "resume with the config it was made with, or start a new run without resuming")


def prepare_output(plan: OutputPlan, fp: dict, source: str) -> None:
    """Remove what ``plan`` lists, create the folder, and record which config this run is."""
    for p in plan.remove:
        if p.is_dir() and not p.is_symlink():  # never follow a link out of the folder
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    plan.folder.mkdir(parents=True, exist_ok=True)
    write_json(plan.folder / RECORD, {"written_by": "lorafit train", "config": source, "fingerprint": fp})


def recorded_fingerprint(adapter_dir: str | Path) -> dict | None:
    """The fingerprint of the run that wrote the adapter in ``adapter_dir`` (a run's output folder or one of its
    checkpoints), or None for an adapter lorafit did not train (PEFT's files do not say how the base was held)."""
    folder = Path(adapter_dir)
    for meta in (read_json(folder / RECORD), read_json(folder / "state.json")):
        if meta and isinstance(meta.get("fingerprint"), dict):
            return meta["fingerprint"]
    return None


def recorded_quantization(adapter_dir: str | Path) -> dict | None:
    """How the run that trained the adapter in ``adapter_dir`` held its base, from its fingerprint:
    ``{"four_bit": quantize_base's arguments or None, "eight_bit": bool, "moe_experts": bool,
    "linearized_experts": bool}``; None when there is no record."""
    from lorafit.config.schema import four_bit_settings

    fp = recorded_fingerprint(adapter_dir)
    if fp is None:
        return None
    return {"four_bit": four_bit_settings(fp.get("adapter"), fp.get("load_in_4bit"), fp.get("bnb_config_kwargs")),
            "eight_bit": bool(fp.get("load_in_8bit")), "moe_experts": bool(fp.get("quantize_moe_experts")),
            "linearized_experts": bool(fp.get("llama4_linearized_experts"))}
