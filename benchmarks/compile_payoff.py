"""When does compiling the fused kernels pay for itself? Eager vs compiled steps, and what compiling costs.

``compile_kernels: auto`` (lorafit's default) compiles only when a run is long enough for the faster steps to
repay the compile time. This script measures the two sides on one config, each in a fresh process:

- ``eager``: steps with compiling off;
- ``cold``: steps with compiling on and an empty Inductor cache (a first run on a new machine);
- ``warm``: the same again, the cache now filled (every later run on that machine).

Per step it records wall time and the process's CPU time (with one thread, CPU time is far less disturbed by
other work on the machine than wall time), and the compile statistics torch keeps. It prints the saving per
step, the compile cost cold and warm, the break-even number of steps, and writes JSON with provenance.

    python benchmarks/compile_payoff.py examples/demo.yaml --steps 12 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import provenance

HERE = Path(__file__).resolve().parent

WORKER = r"""
import json, sys, time
import torch
from lorafit._compat import compile_stats
from lorafit.config import load_config
from lorafit.data import batches, build_datasets
from lorafit.train import prepare_model, train_step
from lorafit.train.optim import optimizer_from_config, scheduler_from_config

path, steps, compile_ = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
cfg = load_config(path, {"compile_kernels": compile_, "max_steps": steps})
options = cfg.runtime_options()
model, tok = prepare_model(cfg, options)
train, _, _ = build_datasets(cfg, tok)
data = batches(train, micro_batch_size=cfg.micro_batch_size, sequence_len=cfg.sequence_len, pad_id=tok.pad_token_id,
               packing=cfg.sample_packing, shuffle=True, seed=cfg.seed, epoch=0)
opt = optimizer_from_config(model, cfg)
sched = scheduler_from_config(opt, cfg, steps)
rows = []
for i in range(steps):
    w0, c0 = time.perf_counter(), time.process_time()
    row = train_step(model, opt, sched, [data[i]], cfg.max_grad_norm, cfg.loss_chunk_tokens, options)
    graphs, compile_s = compile_stats()
    rows.append({"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0, "tokens": row["tokens"],
                 "graphs": graphs, "compile_s": compile_s})
print("RESULT " + json.dumps(rows))
"""


def run(config: str, steps: int, compile_: bool, threads: int, cache: str) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TORCHINDUCTOR_CACHE_DIR=cache)
    proc = subprocess.run([sys.executable, "-c", WORKER, config, str(steps), "1" if compile_ else "0"], env=env,
                          capture_output=True, text=True, check=False)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def planned_tokens_per_step(config: str) -> int:
    """The config's bound on tokens per step, the unit of ``compile_kernels: auto`` (lorafit.options)."""
    from lorafit.config import load_config

    cfg = load_config(config, {"max_steps": 1})
    return cfg.planned_tokens


def steady(rows: list[dict], key: str, skip: int) -> float:
    return statistics.median(r[key] for r in rows[skip:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip", type=int, default=4, help="first steps left out of the steady-state medians")
    ap.add_argument("--out", default=str(HERE / "results" / "compile_payoff.json"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        runs = {"eager": run(args.config, args.steps, False, args.threads, cache),
                "cold": run(args.config, args.steps, True, args.threads, cache),
                "warm": run(args.config, args.steps, True, args.threads, cache)}
    summary = {}
    for name, rows in runs.items():
        summary[name] = {"step_cpu_s": steady(rows, "cpu_s", args.skip), "step_wall_s": steady(rows, "wall_s", args.skip),
                         "first_steps_cpu_s": sum(r["cpu_s"] for r in rows[:args.skip]),
                         "graphs": rows[-1]["graphs"], "compile_s": rows[-1]["compile_s"],
                         "tokens_per_step": statistics.mean(r["tokens"] for r in rows)}
    eager = summary["eager"]["step_cpu_s"]
    planned_per_step = planned_tokens_per_step(args.config)
    for name in ("cold", "warm"):
        s = summary[name]
        s["saving_per_step_cpu_s"] = eager - s["step_cpu_s"]
        # what compiling cost: torch's own wall-clock count of its compile time (the C++ compilers run in
        # worker processes, whose CPU time this process's clock does not see)
        s["break_even_steps"] = s["compile_s"] / s["saving_per_step_cpu_s"] if s["saving_per_step_cpu_s"] > 0 else None
        if s["break_even_steps"] is not None:
            s["break_even_planned_tokens"] = s["break_even_steps"] * planned_per_step
    print(f"{'run':6} {'step cpu s':>10} {'compile s':>10} {'graphs':>6} {'break-even steps':>17}")
    for name, s in summary.items():
        be = s.get("break_even_steps")
        print(f"{name:6} {s['step_cpu_s']:10.2f} {s['compile_s']:10.1f} {s['graphs']:6d} "
              f"{'-' if be is None else f'{be:.0f}':>17}")
    payload = {"provenance": provenance(threads=args.threads), "args": vars(args), "summary": summary, "runs": runs,
               "wall_s": time.perf_counter() - t0}
    Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
