"""The progress bar of ``lorafit train``: step, loss, lr, tokens/s and ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class TrainProgress:
    def __init__(self, total_steps: int, start: int = 0, console: Console | None = None):
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start, loss="-", lr="-", tps="-")
        self._loss_avg: float | None = None

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def update(self, row: dict) -> None:
        # An exponential moving average: per-step loss is too noisy to read at a glance.
        loss = row["loss"]
        self._loss_avg = loss if self._loss_avg is None else 0.9 * self._loss_avg + 0.1 * loss
        fields = dict(loss=f"{self._loss_avg:.4f}", lr=f"{row['lr']:.2e}", tps=f"{row['tokens_per_s']:.0f}")
        self.progress.update(self.task, completed=row["step"], **fields)
        if "eval_loss" in row:
            self.progress.console.print(
                f"step {row['step']}: eval loss {row['eval_loss']:.4f}, perplexity {row['eval_ppl']:.2f}"
            )
