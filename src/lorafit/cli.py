"""The ``lorafit`` command line: one sub-command per verb.

Each verb lives in the module that owns the concept and exposes ``register(subparsers)``; this file only
wires them up and turns a :class:`LorafitError` into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from lorafit.errors import LorafitError

# Modules that each add their verbs (``register(subparsers)``), in the order shown by ``--help``.
COMMAND_MODULES = [
    "lorafit.train.commands",   # train, preprocess, merge, generate, eval
    "lorafit.memory.commands",  # estimate, plan, measure
    "lorafit.lora.commands",    # inspect
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafit", description="LoRA fine-tuning when GPU memory is the limit.")
    parser.add_argument("--version", action="version", version=f"lorafit {__import__('lorafit').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except LorafitError as e:
        print(f"lorafit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorafit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
