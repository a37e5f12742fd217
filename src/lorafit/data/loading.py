"""Reading dataset rows from local files: JSONL, JSON, CSV, Parquet and saved HF ``datasets`` folders.

Rows come out as ``(row, where)`` pairs; ``where`` names the file and the 1-based line (JSONL, CSV) or row
(JSON list, Parquet, HF folder) so every later error can point at it. Nothing is downloaded.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorafit.errors import LorafitError

DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".csv": "csv", ".parquet": "parquet"}


class RowError(Exception):
    """A bad row; the caller adds where it is and decides between raising and skipping."""


def _display(p: Path) -> str:
    """The path as the user will recognise it: relative to the cwd when it lies below it."""
    try:
        return os.path.relpath(p) if not os.path.relpath(p).startswith("..") else str(p)
    except ValueError:  # other drive on Windows
        return str(p)


def resolve_dataset_files(spec, key: str, cfg) -> tuple[str, list[Path] | Path]:
    """Find what ``spec`` (a DatasetSpec at config key ``key``) points at.

    Returns ``("files", [paths])`` or ``("hf_disk", folder)``. Raises a one-line error naming the key and
    every path tried when nothing is there.
    """
    tried = []
    raw = Path(spec.path).expanduser()
    candidates = [raw] if raw.is_absolute() else [cfg.config_dir / raw, Path.cwd() / raw]
    base = next((c for c in candidates if c.exists()), None)
    tried += [str(c) for c in candidates]
    if base is None:
        hint = " (hub datasets are not downloaded: save it to a local folder or file first)" \
            if "/" in spec.path and not spec.path.startswith((".", "/", "~")) else ""
        uniq = list(dict.fromkeys(tried))
        raise LorafitError(f"{cfg.source}: {key}.path: {spec.path!r} not found{hint} (tried: {', '.join(uniq)})")

    if spec.data_files:
        names = [spec.data_files] if isinstance(spec.data_files, str) else list(spec.data_files)
        files = []
        for name in names:
            f = Path(name).expanduser()
            opts = [f] if f.is_absolute() else ([base / f] if base.is_dir() else []) + [cfg.config_dir / f, Path.cwd() / f]
            hit = next((o for o in opts if o.is_file()), None)
            if hit is None:
                raise LorafitError(
                    f"{cfg.source}: {key}.data_files: {name!r} not found (tried: {', '.join(map(str, opts))})"
                )
            files.append(hit)
        return "files", files

    if base.is_file():
        return "files", [base]
    # a folder: a saved HF dataset, or a folder of data files
    if any((base / n).is_file() for n in ("dataset_info.json", "state.json", "dataset_dict.json")):
        return "hf_disk", base
    files = sorted(p for p in base.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    split_files = [p for p in files if spec.split in p.stem]
    files = split_files or files
    if not files:
        raise LorafitError(
            f"{cfg.source}: {key}.path: folder {str(base)!r} holds no saved HF dataset and no "
            f"{'/'.join(DATA_SUFFIXES)} files"
        )
    return "files", files


def file_kind(path: Path, ds_type: str | None) -> str:
    if ds_type:
        return ds_type
    kind = DATA_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise LorafitError(f"{_display(path)}: unknown data file type; set ds_type: json, csv or parquet")
    return kind


def iter_rows(path: Path, kind: str) -> Iterator[tuple[Any, str]]:
    """Yield ``(row, where)`` for one data file. A broken JSON line yields ``(RowError, where)``."""
    name = _display(path)
    if kind == "json":
        yield from _iter_json(path, name)
    elif kind == "csv":
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            for row in reader:
                # reader.line_num is the physical line where the row ended (header is line 1)
                yield dict(row), f"{name} line {reader.line_num}"
    elif kind == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise LorafitError(f"{name}: cannot read Parquet file ({str(e).splitlines()[0]})") from None
        for i, row in enumerate(table.to_pylist(), start=1):
            yield row, f"{name} row {i}"
    else:  # pragma: no cover - guarded by the config schema
        raise LorafitError(f"{name}: unknown ds_type {kind!r}")


def _iter_json(path: Path, name: str) -> Iterator[tuple[Any, str]]:
    with open(path, encoding="utf-8") as fh:
        head = fh.read(4096).lstrip()
    if head.startswith("["):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise LorafitError(f"{name} line {e.lineno}: invalid JSON: {e.msg}") from None
        for i, row in enumerate(data, start=1):
            yield row, f"{name} row {i}"
        return
    if head.startswith("{") and path.suffix.lower() == ".json":
        # either a JSON object holding the rows ({"data": [...]}) or JSON lines in a .json file
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            rows = data.get("data", data.get("rows"))
            if isinstance(rows, list):
                for i, row in enumerate(rows, start=1):
                    yield row, f"{name} row {i}"
                return
            # one object alone is a one-row JSON-lines file; fall through
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{name} line {lineno}"
            try:
                yield json.loads(line), where
            except json.JSONDecodeError as e:
                yield RowError(f"invalid JSON: {e.msg} (column {e.colno})"), where


def iter_hf_disk(folder: Path, split: str) -> Iterator[tuple[Any, str]]:
    from datasets import DatasetDict, load_from_disk

    name = _display(folder)
    try:
        ds = load_from_disk(str(folder))
    except Exception as e:
        raise LorafitError(f"{name}: cannot load saved HF dataset ({str(e).splitlines()[0]})") from None
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise LorafitError(f"{name}: split {split!r} not found; it has: {', '.join(ds)}")
        ds = ds[split]
    for i, row in enumerate(ds, start=1):
        yield row, f"{name} row {i}"


def iter_dataset(spec, key: str, cfg) -> Iterator[tuple[Any, str]]:
    """All rows of one ``datasets[i]`` entry, with their locations."""
    what, target = resolve_dataset_files(spec, key, cfg)
    if what == "hf_disk":
        yield from iter_hf_disk(target, spec.split)
        return
    for f in target:
        yield from iter_rows(f, file_kind(f, spec.ds_type))
