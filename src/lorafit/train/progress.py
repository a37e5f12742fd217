"""Progress of long work: a live bar on a terminal, plain lines where output goes to a log.

A rich bar redraws itself in place, which a log file (``> train.log``, ``nohup``, CI) cannot show: there it
would print nothing until the end. So both classes here look at ``console.is_terminal``: on a terminal they
draw the bar, elsewhere they print one line when work starts, then at most one every ``LOG_EVERY_S`` seconds,
and one when it ends.

- :class:`TrainProgress`: ``lorafit train``'s steps, with loss, learning rate, tokens/s and ETA, and a word
  while the first step compiles kernels.
- :class:`Phases`: a sequence of counted phases (``lorafit eval``: generating held-out answers, retention ...).
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

LOG_EVERY_S = 20.0


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class _Lines:
    """Throttled plain lines: the first, then one per ``LOG_EVERY_S`` seconds, then the last."""

    def __init__(self, console: Console):
        self.console = console
        self.t0 = time.perf_counter()
        self.last = -float("inf")

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def maybe(self, text: str, force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - self.last >= LOG_EVERY_S:
            self.last = now
            self.console.print(text, highlight=False, soft_wrap=True)


class TrainProgress:
    """Steps of a run. ``compiling``: the first step compiles the fused kernels (said before it starts)."""

    def __init__(self, total_steps: int, start: int = 0, console: Console | None = None, compiling: bool = False):
        self.console = console or Console()
        self.total, self.start = total_steps, start
        self.compiling = compiling
        self._loss_avg: float | None = None
        self.live = self.console.is_terminal
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=self.console, transient=False)
            self.task = self.progress.add_task("train", total=total_steps, completed=start,
                                               status=self._first_status())
        else:
            self.lines = _Lines(self.console)

    def _first_status(self) -> str:
        return "compiling kernels for the first step…" if self.compiling else "loss -  lr -  - tok/s"

    def __enter__(self):
        if self.live:
            self.progress.start()
        elif self.start < self.total:
            self.lines.maybe(f"train: step {self.start}/{self.total}"
                             + (" (the first step compiles the fused kernels)" if self.compiling else ""), force=True)
        return self

    def __exit__(self, *exc):
        if self.live:
            self.progress.stop()

    def update(self, row: dict) -> None:
        # An exponential moving average: per-step loss is too noisy to read at a glance.
        loss = row["loss"]
        self._loss_avg = loss if self._loss_avg is None else 0.9 * self._loss_avg + 0.1 * loss
        status = f"loss {self._loss_avg:.4f}  lr {row['lr']:.2e}  {row['tokens_per_s']:.0f} tok/s"
        if "rewards/accuracies" in row:  # preference training: how often the chosen answer wins
            status += f"  reward acc {row['rewards/accuracies']:.2f}"
        if self.live:
            self.progress.update(self.task, completed=row["step"], status=status)
        else:
            done = row["step"] - self.start
            eta = self.lines.elapsed() / done * (self.total - row["step"]) if done else 0.0
            self.lines.maybe(f"train: step {row['step']}/{self.total}  {status}  elapsed "
                             f"{_clock(self.lines.elapsed())}  ETA {_clock(eta)}", force=row["step"] >= self.total)
        if "eval_loss" in row:
            extra = (f"perplexity {row['eval_ppl']:.2f}" if "eval_ppl" in row else
                     f"reward accuracy {row.get('eval_rewards/accuracies', float('nan')):.2f}")
            self.console.print(f"step {row['step']}: eval loss {row['eval_loss']:.4f}, {extra}")


class Phases:
    """Counted phases, one after another: ``with phases.phase("held-out answers", 100) as advance: advance(16)``."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console()

    @contextmanager
    def phase(self, label: str, total: int):
        if self.console.is_terminal:
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=self.console, transient=True) as bar:
                task = bar.add_task(label, total=total)
                yield lambda n=1: bar.advance(task, n)
            return
        lines, done = _Lines(self.console), 0
        lines.maybe(f"{label}: 0/{total}", force=True)

        def advance(n: int = 1) -> None:
            nonlocal done
            done += n
            if done < total:  # the last one is said once, when the phase ends
                lines.maybe(f"{label}: {done}/{total} ({lines.elapsed():.0f} s)")

        yield advance
        lines.maybe(f"{label}: {done}/{total} in {lines.elapsed():.0f} s", force=True)
