"""Where ``lorafit eval``'s time goes: wall and CPU seconds per phase, in one process, as ``lorafit`` runs it.

Runs ``lorafit eval`` with the arguments given and prints one ``[t]`` line per part: process start up to the
first torch import, loading model and adapter, building the eval split, merging, and each counted phase
(``base: eval loss``, ``adapter: held-out answers`` ...), then the process total. CPU time beside wall time
shows whether a part used both cores, and is far less disturbed than wall time by other work on the machine.
Nothing here imports torch before the command does, so the command's own thread settings still apply.

    LORAFIT_CACHE=/tmp/fresh python benchmarks/eval_phases.py eval examples/demo.yaml --adapter runs/demo \\
        --heldout examples/demo/heldout.jsonl --retention examples/retention/retention.jsonl

(a new ``LORAFIT_CACHE`` scores the base column again; link the demo model's folder into it to keep its load warm).
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

T0, C0 = time.perf_counter(), time.process_time()

import lorafit.cli as cli  # noqa: E402
import lorafit.cli.eval as cli_eval  # noqa: E402


def say(label: str, wall: float, cpu: float) -> None:
    print(f"[t] {label}: wall {wall:.2f} s, cpu {cpu:.2f} s", flush=True)


def timed(label: str, fn):
    def wrapper(*a, **k):
        t, c = time.perf_counter(), time.process_time()
        try:
            return fn(*a, **k)
        finally:
            say(label, time.perf_counter() - t, time.process_time() - c)
    return wrapper


def timed_phases(phases_cls) -> None:
    real = phases_cls.phase

    @contextmanager
    def phase(self, label, total):
        t, c = time.perf_counter(), time.process_time()
        with real(self, label, total) as advance:
            yield advance
        say(label, time.perf_counter() - t, time.process_time() - c)

    phases_cls.phase = phase


def instrument() -> None:
    """Wrap the parts once the command has imported torch (called from the model load, its first slow step)."""
    import os

    import torch

    import lorafit.eval.report as report
    from lorafit.train.progress import Phases

    print(f"[t] torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}",
          flush=True)
    say("start and imports", time.perf_counter() - T0, time.process_time() - C0)
    report.build_datasets = timed("build the eval split", report.build_datasets)
    report.merge = timed("merge the adapter", report.merge)
    timed_phases(Phases)


def main() -> int:
    load = cli_eval.model_with_adapter

    def load_instrumented(*a, **k):
        instrument()
        return timed("load model and adapter", load)(*a, **k)

    cli_eval.model_with_adapter = load_instrumented
    rc = cli.main(sys.argv[1:])
    say("total in process", time.perf_counter() - T0, time.process_time() - C0)
    return rc


if __name__ == "__main__":
    sys.exit(main())
