"""Learning the demo task without forgetting: held-out exact match against retention, per demo variant.

Each variant is ``examples/demo.yaml`` with a few keys changed (learning rate, steps, rank, targets, and
whether the base model's own answers to general prompts, ``examples/demo/replay.jsonl``, are mixed in). It
runs what a user runs — ``lorafit train`` then ``lorafit eval --no-base`` — and records held-out exact match,
retention (still correct, and the perplexity of the base model's answers), and the wall time of each command.
The base model's column is scored once.

    python benchmarks/demo_tradeoff.py                     # every variant below
    python benchmarks/demo_tradeoff.py --only replay40     # some of them (comma-separated)

Writes ``benchmarks/results/demo_tradeoff.json`` (with provenance; finished variants are kept when the script
is run again for others) and ``demo_tradeoff.png`` (exact match against retention).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from provenance import provenance

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "demo.yaml"
HELDOUT = ROOT / "examples" / "demo" / "heldout.jsonl"
RETENTION = ROOT / "examples" / "retention" / "retention.jsonl"
RESULTS = ROOT / "benchmarks" / "results"
LORAFIT = [sys.executable, "-m", "lorafit.cli"]

DATES = {"path": str(ROOT / "examples" / "demo" / "train.jsonl"), "type": "chat_template"}
REPLAY = {"path": str(ROOT / "examples" / "demo" / "replay.jsonl"), "type": "chat_template"}

# name -> keys changed from examples/demo.yaml ("replay": how many times the replay file is listed)
VARIANTS = {
    "dates80": {"max_steps": 80, "learning_rate": 5e-4, "replay": 0},
    "dates40": {"max_steps": 40, "learning_rate": 5e-4, "replay": 0},
    "replay80": {"max_steps": 80, "learning_rate": 5e-4, "replay": 3},
    "replay40": {"max_steps": 40, "learning_rate": 5e-4, "replay": 3},
    "replay40_lr1e-3": {"max_steps": 40, "learning_rate": 1e-3, "replay": 3},
    "replay40_lr2e-3": {"max_steps": 40, "learning_rate": 2e-3, "replay": 3},
    "replay60_lr1e-3": {"max_steps": 60, "learning_rate": 1e-3, "replay": 3},
    "replay40_qv_r8": {"max_steps": 40, "learning_rate": 1e-3, "replay": 3, "lora_r": 8, "lora_alpha": 16,
                       "lora_target_linear": None, "lora_target_modules": ["q_proj", "v_proj"]},
}


def variant_config(name: str, work: Path) -> Path:
    cfg = yaml.safe_load(DEMO.read_text())
    keys = dict(VARIANTS[name])
    cfg["datasets"] = [DATES] + [REPLAY] * keys.pop("replay")
    for key, value in keys.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    cfg["output_dir"] = str(work / name)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def timed(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True, env=dict(os.environ, COLUMNS="120"))
    return time.perf_counter() - t0


def run_variant(name: str, work: Path) -> dict:
    cfg = variant_config(name, work)
    out = work / name
    train_s = timed([*LORAFIT, "train", str(cfg)], work / f"{name}.train.log")  # same config again: allowed
    report = out / "eval.json"
    eval_s = timed([*LORAFIT, "eval", str(cfg), "--adapter", str(out), "--heldout", str(HELDOUT),
                    "--retention", str(RETENTION), "--no-base", "--json", str(report), "--force"],
                   work / f"{name}.eval.log")
    scores = json.loads(report.read_text())["adapter"]
    return {"keys": VARIANTS[name], "train_s": train_s, "eval_s": eval_s, **scores}


def base_scores(work: Path) -> dict:
    report = work / "base.json"
    eval_s = timed([*LORAFIT, "eval", "smollm2-135m-instruct", "--heldout", str(HELDOUT), "--retention",
                    str(RETENTION), "--json", str(report), "--force"], work / "base.eval.log")
    return {"eval_s": eval_s, **json.loads(report.read_text())["model"]}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, r in results["variants"].items():
        ax.scatter(r["retention_accuracy"] * 100, r["heldout_exact_match"] * 100)
        ax.annotate(name, (r["retention_accuracy"] * 100, r["heldout_exact_match"] * 100), fontsize=8,
                    xytext=(4, 2), textcoords="offset points")
    base = results.get("base")
    if base:
        ax.scatter(base["retention_accuracy"] * 100, base["heldout_exact_match"] * 100, marker="x", color="k")
        ax.annotate("base", (base["retention_accuracy"] * 100, base["heldout_exact_match"] * 100), fontsize=8)
    ax.set_xlabel("retention: still correct (%)")
    ax.set_ylabel("held-out exact match (%)")
    ax.set_title("demo variants: learning the task vs keeping the rest")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated variant names")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "demo_tradeoff")
    ap.add_argument("--out", type=Path, default=RESULTS / "demo_tradeoff.json")
    ap.add_argument("--no-base", action="store_true", help="keep the stored base column")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(VARIANTS)
    args.work.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.exists() else {"variants": {}}
    results["provenance"] = provenance()
    if not args.no_base or "base" not in results:
        results["base"] = base_scores(args.work)
    for name in names:
        results["variants"][name] = run_variant(name, args.work)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        r = results["variants"][name]
        print(f"{name:18} held-out {r['heldout_exact_match']:.0%}  retention {r['retention_accuracy']:.0%}  "
              f"ppl {r['retention_ppl']:.2f}  train {r['train_s']:.0f} s  eval {r['eval_s']:.0f} s", flush=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
