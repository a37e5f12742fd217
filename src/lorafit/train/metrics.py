"""Metrics on disk (``metrics.jsonl``, one JSON object per line) and the loss-curve plot."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    """Appends rows to ``output_dir/metrics.jsonl``; on resume, rows past the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


class MetricsInMemory:
    """What ranks other than 0 keep of the metrics under torchrun: the same rows, in memory, no file."""

    def __init__(self):
        self._rows: list[dict] = []

    def write(self, row: dict) -> None:
        self._rows.append(dict(row))

    def rows(self) -> list[dict]:
        return list(self._rows)


def plot_loss(metrics_path: Path, out_png: Path, title: str = "lorafit training") -> Path | None:
    """Train loss per step (and eval loss where measured) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(*zip(*train, strict=True), lw=1, alpha=0.5, label="train loss")
    if len(train) >= 10:  # a moving average makes the trend readable through per-step noise
        k = max(5, len(train) // 20)
        steps = [s for s, _ in train][k - 1 :]
        vals = [v for _, v in train]
        avg = [sum(vals[i - k + 1 : i + 1]) / k for i in range(k - 1, len(vals))]
        ax.plot(steps, avg, lw=2, label=f"train loss ({k}-step mean)")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", lw=2, label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / trained token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
