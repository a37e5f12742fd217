"""``lorafit inspect MODEL_OR_ADAPTER``: modules, shapes and trainable counts of a model or an adapter."""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

# lorafit.lora and lorafit.models import torch: they are imported by the functions that need them


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect",
                       help="show the modules, shapes and trainable parameters of a model or adapter")
    p.add_argument("path", help="adapter folder, model folder, .gguf file, or 'demo'")
    p.add_argument("--adapter", help="also attach this adapter to the model and show what it adds")
    p.add_argument("--all", action="store_true", help="list every module instead of grouping repeated layers")
    p.set_defaults(func=cmd_inspect)


def _group(name: str) -> str:
    """``model.layers.12.mlp.up_proj`` → ``model.layers.*.mlp.up_proj``: one row per repeated layer."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def inspect_adapter(path: Path, console: Console) -> None:
    from lorafit.lora.io import WEIGHTS_NAME, read_adapter_config, read_adapter_weights

    config = read_adapter_config(path)
    state = read_adapter_weights(path)
    rows: dict[str, list] = defaultdict(lambda: [0, None, 0])
    for key, t in state.items():
        g = _group(key.removeprefix("base_model.model."))
        rows[g][0] += 1
        rows[g][1] = tuple(t.shape)
        rows[g][2] += t.numel()
    table = Table(title=f"adapter {path}")
    for col in ("tensor", "count", "shape", "params"):
        table.add_column(col, justify="right" if col != "tensor" else "left")
    for g, (n, shape, numel) in sorted(rows.items()):
        table.add_row(g, str(n), str(shape), f"{numel:,}")
    console.print(table)
    total = sum(t.numel() for t in state.values())
    weights = path / WEIGHTS_NAME
    size = weights.stat().st_size if weights.exists() else 0
    scaling = config.alpha / (config.r ** 0.5 if config.use_rslora else config.r)
    console.print(
        f"{'DoRA ' if config.use_dora else ''}r={config.r} alpha={config.alpha} scaling={scaling:.4g} "
        f"dropout={config.dropout} "
        f"targets={config.target_modules} | {total:,} parameters, {size / 2**20:.2f} MiB on disk"
    )


def inspect_model(model, console: Console, show_all: bool = False) -> None:
    from lorafit.lora.inject import count_parameters

    rows: dict[str, list] = {}
    for name, module in model.named_modules():
        params = list(module.named_parameters(recurse=False))
        if not params:
            continue
        key = name if show_all else _group(name)
        row = rows.setdefault(key, [type(module).__name__, 0, None, 0, 0])
        row[1] += 1
        for pname, p in params:
            if pname == "weight":
                row[2] = tuple(p.shape)
            row[3] += p.numel()
            row[4] += p.numel() if p.requires_grad else 0
    table = Table(title=f"{type(model).__name__} ({next(model.parameters()).dtype})")
    for col in ("module", "type", "count", "weight shape", "params", "trainable"):
        table.add_column(col, justify="left" if col in ("module", "type") else "right")
    for key, (typ, n, shape, numel, train) in rows.items():
        table.add_row(key or "(root)", typ, str(n), str(shape), f"{numel:,}", f"{train:,}" if train else "-")
    console.print(table)
    console.print(str(count_parameters(model)))


def cmd_inspect(args) -> int:
    from lorafit.lora.io import CONFIG_NAME, load_adapter
    from lorafit.models import load_model

    console = Console()
    if not console.is_terminal:  # piped: do not squeeze module paths into 80 columns
        console = Console(width=160)
    path = Path(args.path)
    if (path / CONFIG_NAME).is_file():
        inspect_adapter(path, console)
        return 0
    model = load_model(args.path)
    if args.adapter:
        load_adapter(model, args.adapter, trainable=True)
        inspect_adapter(Path(args.adapter), console)
    inspect_model(model, console, show_all=args.all)
    return 0
