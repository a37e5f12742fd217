"""The base model's column of ``lorafit eval``, kept between runs.

Scoring an adapter means scoring its base model too, and the base column costs as much as the adapter's
while it never changes: same weights, same prompts, same greedy decoding give the same numbers. So the base
column is stored under ``$LORAFIT_CACHE/eval/`` (default ``~/.cache/lorafit/eval/``), keyed by everything it
depends on — the base model's files (name, size, modification time), the held-out / retention files' contents,
the config's data keys and the hash of its dataset files (for the eval split), the limit, lorafit / torch /
transformers versions and torch's thread count (summation order). Anything else changes the key, so a stale
entry is never read; ``lorafit eval --no-cache`` recomputes and stores it again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lorafit.fsutil import cache_root, read_json, write_json
from lorafit.models import DEMO_ALIASES, demo_model_file, resolve_model_path

# The config keys the base column's numbers depend on (the eval split and how it is tokenised and batched).
CONFIG_KEYS = ("tokenizer_config", "special_tokens", "chat_template", "eot_tokens", "train_on_eos",
               "default_system_message", "datasets", "test_datasets", "val_set_size",
               "sequence_len", "train_on_inputs", "micro_batch_size", "seed", "bf16", "fp16")


def cache_dir() -> Path:
    return cache_root() / "eval"


def _file_id(p: Path) -> list:
    st = p.stat()
    return [p.name, st.st_size, st.st_mtime_ns]


def model_identity(base_model: str, base_dir: Path | None) -> list:
    """The base model's files as (name, size, mtime): a changed or replaced weight file changes the key."""
    if base_model in DEMO_ALIASES:
        return ["demo", _file_id(demo_model_file())]
    folder, gguf = resolve_model_path(base_model, base_dir)
    if gguf:
        return [str(folder / gguf), _file_id(folder / gguf)]
    return [str(folder), sorted(_file_id(p) for p in folder.iterdir() if p.is_file())]


def _sha256(path: str | None) -> str | None:
    if not path:
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def base_key(base_model: str, cfg, heldout: str | None, retention: str | None, limit: int | None,
             quantized=None) -> str:
    """The cache key of a base column (``quantized``: how a 4-bit base was quantized, if it was)."""
    import torch
    import transformers

    import lorafit

    parts = {"model": model_identity(base_model, cfg.config_dir if cfg is not None else None),
             "heldout": _sha256(heldout), "retention": _sha256(retention), "limit": limit,
             "versions": [lorafit.__version__, torch.__version__, transformers.__version__],
             "threads": torch.get_num_threads(), "quantized": repr(quantized)}
    if cfg is not None:
        from lorafit.train.run_record import fingerprint

        fp = fingerprint(cfg)
        parts["config"] = {k: fp.get(k) for k in CONFIG_KEYS}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def load(key: str) -> dict | None:
    path = cache_dir() / f"{key}.json"
    try:
        return read_json(path) if path.is_file() else None
    except Exception:  # a damaged entry is recomputed, never an error
        return None


def store(key: str, metrics: dict) -> None:
    """Keep ``metrics`` (display-only keys included); a cache that cannot be written is skipped silently."""
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        write_json(cache_dir() / f"{key}.json", metrics)
    except OSError:
        pass


def forget(key: str) -> None:
    (cache_dir() / f"{key}.json").unlink(missing_ok=True)
