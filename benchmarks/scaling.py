"""1 process vs 2 (DDP, FSDP2) on the same global batch: tokens/s, per-rank memory, and whether results agree.

Each run is lorafit's own trainer (``lorafit.train.train``) in fresh processes, one thread each, on a random
Llama built here (no download): 1 process with micro-batch 2b, then 2 processes of micro-batch b under torchrun
with DDP, then with FSDP2. Per run it records

- tokens/s: the median over the steps after the first two of the trained tokens of *all* ranks per second;
- per rank: the peak resident memory of the process (``ru_maxrss``: whole process, torch's libraries, the
  allocator's free lists and the load included) and the parameter bytes the rank holds (FSDP2 holds its shard;
  DDP and 1 process hold the whole model);
- per rank, tensors only: the peak of MemTracker over 2 steps of full-length batches (micro-batch ×
  sequence_len; the training rows are shorter) on the same model, wrapped the same way, and lorafit's estimate
  per rank of that step (``lorafit estimate --nproc N [--fsdp]``);
- agreement: the largest relative difference of each step's loss and of the final adapter from the 1-process
  run (fp32, dropout 0: these should be ~1e-6, fp32 summation order).

    OMP_NUM_THREADS=1 python benchmarks/scaling.py --steps 12 --hidden 256 --layers 4

Prints a table and writes ``benchmarks/results/scaling.json`` with provenance. On a machine with fewer free
cores than processes the 2-process speed measures the sharing, not the scaling: the CPU model and thread count
are in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from provenance import provenance

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"

WORKER = r"""
import json, os, resource, sys
from dataclasses import replace
from pathlib import Path
import torch
torch.set_num_threads(1)
from lorafit.config import load_config
from lorafit.measure import every_rank, measure
from lorafit.memory.estimate import estimate
from lorafit.memory.settings import settings_from_config
from lorafit.memory.spec import resolve_spec
from lorafit.train import train
from lorafit.train.distributed import held_fraction

cfg = load_config(sys.argv[1])
rank, nproc = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
report = Path(sys.argv[2], f"rank{rank}.json")
if sys.argv[3] == "train":
    result = train(cfg)
    local, whole = held_fraction(result.model)
    dtype_bytes = next(result.model.parameters()).element_size()
    out = {"rank": rank, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "held_param_bytes": local * dtype_bytes, "model_param_bytes": whole * dtype_bytes}
else:  # a launch of its own, so that its memory is not in the training processes' RSS
    # tensor memory of the same step, per rank: MemTracker over 2 steps of full-length batches (micro-batch x
    # sequence_len; the training rows are shorter), and the estimate per rank of that step
    spec = resolve_spec(cfg.base_model_path)
    s = replace(settings_from_config(cfg, "cpu", nproc=nproc), dtype="float32")
    m = every_rank(measure(spec, s, 2, model_name=cfg.base_model_path))[rank]
    out = {**json.loads(report.read_text()), "tensor_peak_bytes": m.peak,
           "estimate_bytes": estimate(spec, s).allocated_peak}
report.write_text(json.dumps(out))
"""


def build(folder: Path, hidden: int, layers: int) -> None:
    """A random Llama with the demo tokenizer's vocabulary, and chat rows of varied length."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import save_tiny_llama

    from lorafit.models import load_tokenizer

    save_tiny_llama(folder / "model", load_tokenizer("demo"), hidden_size=hidden, intermediate_size=2 * hidden,
                    num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4)
    words = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "lemon"]
    rows = [{"messages": [{"role": "user", "content": f"Repeat twice: {w}" + " please" * (i % 7)},
                          {"role": "assistant", "content": f"{w} {w}"}]} for i, w in enumerate(words * 40)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def run(folder: Path, name: str, nproc: int, micro: int, steps: int, fsdp: bool) -> dict:
    import yaml

    out = folder / name
    cfg = dict(base_model=str(folder / "model"), adapter="lora", lora_r=8, lora_alpha=16, lora_target_linear=True,
               datasets=[{"path": str(folder / "data.jsonl"), "type": "chat_template"}], sequence_len=128,
               micro_batch_size=micro, max_steps=steps, learning_rate=1e-3, lr_scheduler="constant", seed=1,
               output_dir=str(out), lora_dropout=0.0, compile_kernels=False, **({"fsdp_version": 2} if fsdp else {}))
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    report = folder / f"{name}-ranks"
    report.mkdir()
    worker = folder / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc-per-node={nproc}"]
    for what in ("train", "measure"):
        done = subprocess.run([*launcher, str(worker), str(path), str(report), what], capture_output=True, text=True,
                              env=env)
        if done.returncode:
            raise SystemExit(f"{name} ({what}) failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    steps_rows = [r for r in rows if "loss" in r]
    ranks = [json.loads((report / f"rank{r}.json").read_text()) for r in range(nproc)]
    return {"name": name, "processes": nproc, "micro_batch_per_rank": micro, "fsdp": fsdp,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps_rows[2:]),
            "losses": [r["loss"] for r in steps_rows], "ranks": ranks, "adapter": str(out)}


def rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


def adapter_diff(a: str, b: str) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(Path(a) / "adapter_model.safetensors"), load_file(Path(b) / "adapter_model.safetensors")
    return max(float((wa[k] - wb[k]).abs().max() / wb[k].abs().max().clamp_min(1e-12)) for k in wb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--micro", type=int, default=4, help="micro-batch per rank (1 process: twice this)")
    ap.add_argument("--out", default=str(HERE / "results" / "scaling.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build(folder, args.hidden, args.layers)
        runs = [run(folder, "1 process", 1, 2 * args.micro, args.steps, False),
                run(folder, "2 × DDP", 2, args.micro, args.steps, False),
                run(folder, "2 × FSDP2", 2, args.micro, args.steps, True)]
        base = runs[0]
        for r in runs:
            r["max_rel_loss_diff"] = rel_diff(r["losses"], base["losses"])
            r["max_rel_adapter_diff"] = adapter_diff(r.pop("adapter"), base["adapter"]) if r is not base else 0.0
        base.pop("adapter", None)
    print(f"{'run':<11} {'tokens/s':>9} {'peak RSS / rank':>16} {'tensors / rank':>15} {'estimate':>9} "
          f"{'params held / rank':>19} {'loss Δ':>8} {'adapter Δ':>9}   (MiB)")
    def each(r, key, fmt="{:.0f}"):
        return " / ".join(fmt.format(k[key] / 2**20) for k in r["ranks"])

    for r in runs:
        print(f"{r['name']:<11} {r['tokens_per_s']:>9.0f} {each(r, 'peak_rss_bytes'):>16} "
              f"{each(r, 'tensor_peak_bytes', '{:.1f}'):>15} {r['ranks'][0]['estimate_bytes'] / 2**20:>9.1f} "
              f"{each(r, 'held_param_bytes', '{:.1f}'):>19} {r['max_rel_loss_diff']:>8.1e} "
              f"{r['max_rel_adapter_diff']:>9.1e}")
    payload = {"command": " ".join(["python", "benchmarks/scaling.py", *sys.argv[1:]]), "args": vars(args),
               "runs": runs, "provenance": provenance(threads=1)}
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
