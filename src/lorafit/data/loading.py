"""Reading dataset rows from local files: JSONL, JSON, CSV, Parquet and saved HF ``datasets`` folders.

Rows come out as ``(row, where)`` pairs; ``where`` names the file and the 1-based line (JSONL, CSV) or row
(JSON list, Parquet, HF folder) so every later error can point at it. Nothing is downloaded. Text files are
UTF-8, with or without a byte-order mark, unless the entry sets ``encoding:`` (see :mod:`lorafit.data.text`).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorafit.data.text import NotText, text_lines
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
    base = cfg.resolve_path(spec.path)  # the one path rule: relative to the config file's folder
    if not base.exists():
        raise LorafitError(f"{cfg.source}: {key}.path: {spec.path!r} not found (looked for {base}){_not_found_hint(spec.path)}")

    if spec.data_files:
        names = [spec.data_files] if isinstance(spec.data_files, str) else list(spec.data_files)
        files = []
        for name in names:
            f = Path(name).expanduser()
            hit = f if f.is_absolute() else (base / f if base.is_dir() else cfg.resolve_path(f))
            if not hit.is_file():
                raise LorafitError(f"{cfg.source}: {key}.data_files: {name!r} not found (looked for {hit})")
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


def _not_found_hint(path: str) -> str:
    """Why a dataset path may be missing: written relative to the working directory, or a Hub name."""
    if (Path.cwd() / path).exists() and not Path(path).expanduser().is_absolute():
        return (f"; it exists relative to the working directory — paths in a config are relative to the config "
                f"file's folder, so write it as {(Path.cwd() / path).resolve()}")
    if "/" in path and not path.startswith((".", "/", "~")):
        return "; Hub datasets are not downloaded: save it to a local file or folder first"
    return ""


def file_kind(path: Path, ds_type: str | None) -> str:
    if ds_type:
        return ds_type
    kind = DATA_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise LorafitError(f"{_display(path)}: unknown data file type; set ds_type: json, csv or parquet")
    return kind


def iter_rows(path: Path, kind: str, encoding: str | None = None, key: str = "datasets") -> Iterator[tuple[Any, str]]:
    """Yield ``(row, where)`` for one data file. A broken JSON line yields ``(RowError, where)``.

    Text files are read with ``encoding`` (UTF-8, with or without a byte-order mark, when None); ``key`` is
    the config entry the file comes from, named in the fix when the file is not text in that encoding.
    """
    name = _display(path)
    empty = True
    if kind == "parquet":
        rows = _iter_parquet(path, name)
    elif kind in ("json", "csv"):
        lines = _line_reader(path, name, encoding, key)
        rows = _iter_json(path, name, lines) if kind == "json" else _iter_csv(name, lines)
    else:  # pragma: no cover - guarded by the config schema
        raise LorafitError(f"{name}: unknown ds_type {kind!r}")
    for item in rows:
        empty = False
        yield item
    if empty:
        raise LorafitError(f"{name}: the file holds no rows; fill it, or remove it from {key}")


def _line_reader(path: Path, name: str, encoding: str | None, key: str):
    """A function that reads the file's lines anew on each call (ends kept, as the csv module needs), failing
    with one line naming the file, line, byte and fix when they are not text in ``encoding``."""

    def lines() -> Iterator[str]:
        try:
            yield from text_lines(path, encoding)
        except NotText as e:
            raise LorafitError(f"{name} {e}; {_encoding_fix(e, key)}") from None
        except OSError as e:
            raise LorafitError(f"{name}: cannot read the file ({e.strerror or e})") from None

    return lines


def _encoding_fix(e: NotText, key: str) -> str:
    if e.binary:
        return f"point {key}.path at a JSONL, JSON, CSV or Parquet file (for UTF-16 text set encoding: utf-16)"
    if e.suggest:
        return (f"set encoding: {e.suggest} on {key}, or convert the file to UTF-8 "
                f"(iconv -f {e.iconv_name} -t utf-8)")
    return f"set {key}.encoding to the file's real encoding, or convert the file to UTF-8"


def _iter_csv(name: str, lines) -> Iterator[tuple[Any, str]]:
    reader = csv.DictReader(lines())
    try:
        for row in reader:
            # reader.line_num is the physical line where the row ended (header is line 1)
            yield dict(row), f"{name} line {reader.line_num}"
    except csv.Error as e:  # e.g. a NUL byte past the sniffed start, a field over the size limit
        raise LorafitError(f"{name} line {reader.line_num}: invalid CSV: {e}") from None


def _iter_parquet(path: Path, name: str) -> Iterator[tuple[Any, str]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:
        raise LorafitError(f"{name}: cannot read Parquet file ({str(e).splitlines()[0]})") from None
    for i, row in enumerate(table.to_pylist(), start=1):
        yield row, f"{name} row {i}"


def _iter_json(path: Path, name: str, lines) -> Iterator[tuple[Any, str]]:
    """Rows of a JSON list, a ``{"data": [...]}`` object, or JSON lines; ``lines()`` reads the file anew."""
    first = _first_char(lines())
    json_lines = path.suffix.lower() in (".jsonl", ".ndjson")
    if first == "[" or (first == "{" and not json_lines):
        try:
            data = json.loads("".join(lines()))
        except json.JSONDecodeError as e:
            if first == "[" and not json_lines:
                raise LorafitError(f"{name} line {e.lineno}: invalid JSON: {e.msg}") from None
            data = None  # JSON lines after all (the first row may be a list): each line is judged alone
        if isinstance(data, dict):
            data = data.get("data", data.get("rows"))  # rows held in an object; one object alone is one row
        if isinstance(data, list):
            for i, row in enumerate(data, start=1):
                yield row, f"{name} row {i}"
            return
    for lineno, line in enumerate(lines(), start=1):
        if not line.strip():
            continue
        where = f"{name} line {lineno}"
        try:
            yield json.loads(line), where
        except json.JSONDecodeError as e:
            yield RowError(f"invalid JSON: {e.msg} (column {e.colno})"), where


def _first_char(lines: Iterator[str]) -> str:
    """The file's first non-blank character ('' for a blank file): ``[`` starts a JSON list."""
    for line in lines:
        if line.strip():
            return line.lstrip()[0]
    return ""


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
        yield from iter_rows(f, file_kind(f, spec.ds_type), spec.encoding, key)
