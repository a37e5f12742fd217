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
    p.add_argument("--nproc", type=int, metavar="N",
                   help="train on N processes of this machine: starts torchrun --nproc-per-node N (DDP, or FSDP2 "
                        "when the config sets fsdp keys); for several machines run torchrun yourself")
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


def torchrun_command(argv: list[str], nproc: int) -> list[str]:
    """The torchrun command line that runs ``lorafit train`` with ``argv`` (without --nproc) on ``nproc``
    processes of this machine."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "lorafit.cli", "train", *argv]


def launch(args) -> int:
    """``--nproc N``: run this same command under torchrun; its exit status is the job's."""
    import os
    import subprocess

    if args.nproc < 1:
        raise LorafitError(f"--nproc: got {args.nproc}, must be an integer >= 1")
    if "LOCAL_RANK" in os.environ:
        raise LorafitError("--nproc inside a torchrun launch: leave it out (torchrun already started the processes)")
    argv = [args.config]
    argv += ["--resume"] if args.resume else []
    argv += ["--max-steps", str(args.max_steps)] if args.max_steps is not None else []
    argv += ["--output-dir", args.output_dir] if args.output_dir is not None else []
    argv += ["--overwrite"] if args.overwrite else []
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    try:
        return subprocess.run(torchrun_command(argv, args.nproc), env=env).returncode
    except KeyboardInterrupt:  # torchrun passes Ctrl-C on to the ranks, which checkpoint and stop
        return 130


def cmd_train(args) -> int:
    from lorafit.train import train

    if args.nproc is not None and args.nproc != 1:
        return launch(args)
    if args.max_steps is not None and args.max_steps < 1:
        raise LorafitError(f"--max-steps: got {args.max_steps}, must be an integer >= 1 (leave it out to train "
                           "num_epochs)")
    cfg = load_cfg(args.config, max_steps=args.max_steps, output_dir=args.output_dir)
    console = Console()
    result = train(cfg, resume=args.resume, console=console, overwrite=args.overwrite)
    if result.interrupted:
        return 130
    if result.rank != 0:  # under torchrun rank 0 reports for the job
        return 0
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
