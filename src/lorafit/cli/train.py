"""``lorafit train`` and ``lorafit preprocess``: fine-tune from a YAML config, or show what it trains on."""

from __future__ import annotations

import argparse

from rich.console import Console

from lorafit.errors import LorafitError
from lorafit.fsutil import display


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune from a YAML config (LoRA or full)")
    p.add_argument("config")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last complete checkpoint in output_dir")
    p.add_argument("--max-steps", type=int, help="override max_steps")
    p.add_argument("--output-dir", help="override output_dir")
    p.add_argument("--overwrite", action="store_true",
                   help="replace another run's outputs in output_dir (files lorafit did not write are kept)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("preprocess", help="tokenise the datasets of a config and show what is trained")
    p.add_argument("config")
    p.add_argument("--show", type=int, default=3, metavar="N",
                   help="print N samples with trained tokens highlighted")
    p.set_defaults(func=cmd_preprocess)


def load_cfg(path: str, **overrides):
    """The config at ``path`` with the flags that were given (not None) in place of its keys, validated like
    keys written in the file. A path flag is relative to the working directory, as paths on a command line are."""
    from pathlib import Path

    from lorafit.config import load_config  # pydantic: only when a command runs

    if overrides.get("output_dir") is not None:
        overrides["output_dir"] = str(Path(overrides["output_dir"]).expanduser().absolute())
    return load_config(path, overrides)


def cmd_train(args) -> int:
    from lorafit.train import train

    if args.max_steps is not None and args.max_steps < 1:
        raise LorafitError(f"--max-steps: got {args.max_steps}, must be an integer >= 1 (leave it out to train "
                           "num_epochs)")
    cfg = load_cfg(args.config, max_steps=args.max_steps, output_dir=args.output_dir)
    console = Console()
    result = train(cfg, resume=args.resume, console=console, overwrite=args.overwrite)
    if result.interrupted:
        return 130
    console.print(summary(result))
    console.print(f"wrote {display(result.output_dir)} (adapter / model, metrics.jsonl, loss.png, lorafit-run.json)",
                  highlight=False)
    return 0


def summary(result) -> str:
    """One line: steps, time, throughput, final losses."""
    parts = [f"done: {result.steps} steps in {result.wall_s:.0f} s ({result.tokens_per_s:.0f} tokens/s)"]
    if result.train_loss is not None:
        parts.append(f"final train loss {result.train_loss:.4f}")
    if result.eval_loss is not None:
        parts.append(f"eval loss {result.eval_loss:.4f}")
    if result.compiles:
        parts.append(f"{result.compiles} kernel graphs compiled ({result.compile_s:.0f} s of it)")
    return " | ".join(parts)


def cmd_preprocess(args) -> int:
    from lorafit.data.preview import show_samples

    show_samples(load_cfg(args.config), args.show, Console())
    return 0
