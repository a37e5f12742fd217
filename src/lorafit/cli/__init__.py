"""The ``lorafit`` command line: one sub-command per verb.

Each command group is a module of this package that exposes ``register(subparsers)``; this file only wires
them up and turns a :class:`LorafitError` into one line on stderr and exit code 2. Command modules import
torch and the modules that need it inside their command functions, so ``lorafit --help`` and the estimator
stay quick.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from lorafit.errors import LorafitError

# Modules that each add their verbs (``register(subparsers)``), in the order shown by ``--help``.
COMMAND_MODULES = [
    "lorafit.cli.train",     # train, preprocess
    "lorafit.cli.merge",     # merge
    "lorafit.cli.generate",  # generate
    "lorafit.cli.eval",      # eval
    "lorafit.cli.memory",    # estimate, plan, measure
    "lorafit.cli.inspect",   # inspect
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafit",
                                     description="LoRA fine-tuning when GPU memory is the limit.")
    parser.add_argument("--version", action="version", version=f"lorafit {__import__('lorafit').__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log what lorafit does to stderr (-v: info, -vv: debug, e.g. kernel compilations)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _rank() -> str:
    """`` (rank N)`` inside a torchrun launch of several processes, else empty."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:
        return f" (rank {os.environ['RANK']})"
    return ""


def _peer_failed(e: RuntimeError) -> bool:
    """A collective that failed because a peer process went away (gloo / NCCL errors, a timeout)."""
    names = {t.__name__ for t in type(e).__mro__}
    text = str(e)
    return bool(names & {"DistError", "DistBackendError", "DistNetworkError"}) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out"))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    if args.verbose:
        logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s: %(message)s", level=logging.WARNING)
        logging.getLogger("lorafit").setLevel(logging.INFO if args.verbose == 1 else logging.DEBUG)
    try:
        return int(args.func(args) or 0)
    except LorafitError as e:
        print(f"lorafit {args.command}: error{_rank()}: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if not (_rank() and _peer_failed(e)):
            raise
        # under torchrun another rank failed first (its own line says why); this one only says it stopped
        print(f"lorafit {args.command}: stopped{_rank()}: another process of the job failed "
              f"({str(e).splitlines()[0].split('] ', 1)[-1][:120]})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lorafit {args.command}: interrupted", file=sys.stderr)
        return 130

