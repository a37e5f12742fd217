"""Estimate vs measured peak memory of lorafit training steps, on this machine's CPU (MemTracker) or CUDA.

Each configuration runs in a fresh subprocess (peaks cannot leak between rows): build the model (random
weights from a transformers config of the given shape, or the real demo model), attach the adapter as the
trainer does, run 3 steps of ``lorafit.train.train_step``, take the peak; compare with
``lorafit.memory.estimate`` (tensor memory, no framework overhead). The JSON records its provenance
(``benchmarks/provenance.py``: commit, CPU and flags, threads, versions, lorafit's runtime options) and each row
the runtime options it was measured and estimated with (``--reestimate`` uses them).

    .venv/bin/python benchmarks/estimate_vs_measured.py            # the 22 fit rows, writes results JSON
    .venv/bin/python benchmarks/estimate_vs_measured.py --rows heldout   # the held-out rows (never fitted),
                                                                   # writes estimate_vs_measured_heldout.json
    .venv/bin/python benchmarks/estimate_vs_measured.py --rows qlora   # QLoRA and 8-bit AdamW rows (never
                                                                   # fitted), writes estimate_vs_measured_qlora.json
    .venv/bin/python benchmarks/estimate_vs_measured.py --rows int8    # LoRA over an 8-bit base (never fitted),
                                                                   # writes estimate_vs_measured_int8.json
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/estimate_vs_measured.py --rows distributed   # DDP and FSDP2
                                                                   # rows: one rank of 2 torchrun processes
                                                                   # (gloo, one thread each), writes
                                                                   # estimate_vs_measured_distributed.json
    .venv/bin/python benchmarks/estimate_vs_measured.py --rows preference   # rl: dpo / orpo / kto (never
                                                                   # fitted), writes
                                                                   # estimate_vs_measured_preference.json
    .venv/bin/python benchmarks/estimate_vs_measured.py --quick    # 5 rows
    .venv/bin/python benchmarks/estimate_vs_measured.py --cuda     # on a GPU (see scripts/gpu_check.sh)
    .venv/bin/python benchmarks/estimate_vs_measured.py --reestimate   # rescore the JSON's measured peaks
                                                                       # with the current estimator (no runs)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from provenance import provenance

from lorafit.memory.spec import ModelSpec

ROOT = Path(__file__).resolve().parents[1]


def _spec(name, arch, d, inter, layers, heads, kv, vocab, tied=True, **kw) -> ModelSpec:
    return ModelSpec(name, arch, d, inter, layers, heads, kv, d // heads, vocab, tied, **kw)


SHAPES = {
    "llama-tiny": _spec("llama-tiny", "llama", 128, 344, 4, 4, 2, 4096),
    "llama-small": _spec("llama-small", "llama", 256, 688, 6, 8, 4, 16384, tied=False),
    "qwen2-small": _spec("qwen2-small", "qwen2", 256, 704, 4, 8, 2, 32000, qkv_bias=True),
    "gemma-small": _spec("gemma-small", "gemma", 256, 768, 4, 4, 1, 16000),
    "gpt2-small": _spec("gpt2-small", "gpt2", 256, 1024, 4, 4, 4, 8192, norm="layer", mlp="plain", max_positions=512),
    "phi3-tiny": _spec("phi3-tiny", "phi3", 192, 512, 3, 6, 6, 32064, tied=False),
    "llama-1b-slice": _spec("llama-1b-slice", "llama", 2048, 8192, 1, 32, 8, 128256),  # Llama 3.2 1B, one layer
}

# (shape, settings). Settings keys: see lorafit.memory.estimate.Settings.
# The "fit" rows: the estimator's backward constants were calibrated on these 22 rows (in-sample).
ROWS = [
    ("llama-tiny", dict(method="lora", dtype="float32", micro_batch=2, seq_len=128, r=8)),
    ("llama-tiny", dict(method="lora", dtype="bfloat16", micro_batch=4, seq_len=128, r=64)),
    ("llama-tiny", dict(method="full", dtype="float32", micro_batch=2, seq_len=256)),
    ("llama-tiny", dict(method="full", dtype="bfloat16", micro_batch=1, seq_len=512, gradient_checkpointing=True)),
    ("llama-tiny", dict(method="lora", dtype="float32", micro_batch=2, seq_len=256, r=16, gradient_checkpointing=True)),
    ("llama-small", dict(method="lora", dtype="bfloat16", micro_batch=2, seq_len=256, r=16)),
    ("llama-small", dict(method="lora", dtype="float32", micro_batch=1, seq_len=256, r=4, targets=["q_proj", "v_proj"], dropout=0.0)),
    ("llama-small", dict(method="full", dtype="bfloat16", micro_batch=2, seq_len=128, optimizer="sgd")),
    ("llama-small", dict(method="lora", dtype="bfloat16", micro_batch=1, seq_len=512, r=32, targets=["gate_proj", "up_proj", "down_proj"])),
    ("qwen2-small", dict(method="lora", dtype="bfloat16", micro_batch=2, seq_len=256, r=16)),
    ("qwen2-small", dict(method="full", dtype="float32", micro_batch=1, seq_len=256)),
    ("qwen2-small", dict(method="lora", dtype="float32", micro_batch=2, seq_len=128, r=8, gradient_checkpointing=True)),
    ("gemma-small", dict(method="lora", dtype="bfloat16", micro_batch=2, seq_len=256, r=16)),
    ("gemma-small", dict(method="full", dtype="bfloat16", micro_batch=1, seq_len=256)),
    ("gemma-small", dict(method="lora", dtype="float32", micro_batch=1, seq_len=256, r=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"])),
    ("gpt2-small", dict(method="lora", dtype="float32", micro_batch=2, seq_len=256, r=16)),
    ("gpt2-small", dict(method="full", dtype="bfloat16", micro_batch=2, seq_len=128)),
    ("phi3-tiny", dict(method="lora", dtype="bfloat16", micro_batch=2, seq_len=128, r=8)),
    ("llama-1b-slice", dict(method="lora", dtype="bfloat16", micro_batch=1, seq_len=256, r=16)),
    ("demo", dict(method="lora", dtype="bfloat16", micro_batch=2, seq_len=128, r=16)),
    ("demo", dict(method="lora", dtype="float32", micro_batch=1, seq_len=128, r=8, gradient_checkpointing=True)),
    ("demo", dict(method="full", dtype="bfloat16", micro_batch=1, seq_len=128)),
]
QUICK = [0, 2, 9, 12, 15]

# Held-out shapes and rows: never used to fit a constant of lorafit.memory (out-of-sample check). Other widths
# (256-1024), GQA ratios (heads/kv 1, 2, 4, 8), vocabularies 8k-128k, tied and untied heads.
HELDOUT_SHAPES = {
    "h-llama-tied": _spec("h-llama-tied", "llama", 512, 1376, 4, 8, 2, 32000),  # GQA 4, tied
    "h-llama-untied": _spec("h-llama-untied", "llama", 384, 1024, 4, 6, 6, 8192, tied=False),  # MHA (GQA 1)
    "h-mistral-gqa8": _spec("h-mistral-gqa8", "mistral", 512, 1536, 3, 8, 1, 32768, tied=False),  # GQA 8
    "h-qwen2-1024": _spec("h-qwen2-1024", "qwen2", 1024, 2816, 2, 16, 8, 65536, qkv_bias=True),  # GQA 2, tied
    "h-llama-128k": _spec("h-llama-128k", "llama", 256, 704, 2, 4, 2, 128256),  # Llama 3 vocabulary, tied
    "h-gemma": _spec("h-gemma", "gemma", 384, 1024, 3, 6, 3, 24000),
    "h-gpt2": _spec("h-gpt2", "gpt2", 512, 2048, 3, 8, 8, 12000, norm="layer", mlp="plain", max_positions=1024),
    "h-phi3": _spec("h-phi3", "phi3", 256, 640, 4, 8, 4, 16000, tied=False),
}
QV, MLP = ["q_proj", "v_proj"], ["gate_proj", "up_proj", "down_proj"]
HELDOUT_ROWS = [
    ("h-llama-tied", dict(method="full", dtype="bfloat16", micro_batch=1, seq_len=256)),  # issue 20's miss
    ("h-llama-tied", dict(method="full", dtype="float32", micro_batch=2, seq_len=128)),
    ("h-llama-tied", dict(method="lora", dtype="bfloat16", micro_batch=2, seq_len=256, r=16, gradient_checkpointing=True)),
    ("h-llama-untied", dict(method="full", dtype="bfloat16", micro_batch=2, seq_len=256)),
    ("h-llama-untied", dict(method="lora", dtype="float32", micro_batch=4, seq_len=128, r=8, targets=QV)),
    ("h-mistral-gqa8", dict(method="lora", dtype="bfloat16", micro_batch=1, seq_len=512, r=32, targets=MLP)),
    ("h-mistral-gqa8", dict(method="full", dtype="float32", micro_batch=1, seq_len=256, gradient_checkpointing=True)),
    ("h-qwen2-1024", dict(method="lora", dtype="bfloat16", micro_batch=1, seq_len=256, r=16)),
    ("h-qwen2-1024", dict(method="lora", dtype="float32", micro_batch=2, seq_len=128, r=8, targets=QV, gradient_checkpointing=True)),
    ("h-llama-128k", dict(method="lora", dtype="bfloat16", micro_batch=2, seq_len=128, r=8)),
    ("h-llama-128k", dict(method="full", dtype="bfloat16", micro_batch=1, seq_len=128)),
    ("h-gemma", dict(method="lora", dtype="float32", micro_batch=2, seq_len=256, r=16, targets=MLP)),
    ("h-gemma", dict(method="full", dtype="bfloat16", micro_batch=1, seq_len=256, gradient_checkpointing=True)),
    ("h-gpt2", dict(method="lora", dtype="bfloat16", micro_batch=2, seq_len=256, r=16)),
    ("h-gpt2", dict(method="full", dtype="float32", micro_batch=1, seq_len=256)),
    ("h-phi3", dict(method="lora", dtype="bfloat16", micro_batch=4, seq_len=64, r=8)),
    # added after the full fine-tuning fixes of issue 20 (rows 0, 6 and 14 above showed the misses)
    ("h-gemma", dict(method="full", dtype="float32", micro_batch=2, seq_len=128)),
    ("h-phi3", dict(method="full", dtype="bfloat16", micro_batch=2, seq_len=128)),
    ("h-llama-untied", dict(method="full", dtype="float32", micro_batch=1, seq_len=256, gradient_checkpointing=True)),
    ("h-gpt2", dict(method="full", dtype="bfloat16", micro_batch=2, seq_len=128, gradient_checkpointing=True)),
    ("h-mistral-gqa8", dict(method="full", dtype="bfloat16", micro_batch=1, seq_len=128)),
]
# QLoRA (a 4-bit NF4 base, double quantization) and bitsandbytes' 8-bit AdamW (issue 16): estimated with the
# constants fitted above, never fitted themselves. `--rows qlora` writes estimate_vs_measured_qlora.json.
QLORA_ROWS = [
    (shape, dict(method="qlora", dtype=dtype, micro_batch=2, seq_len=256, r=16, gradient_checkpointing=ckpt))
    for shape in ("llama-small", "qwen2-small") for dtype in ("float32", "bfloat16") for ckpt in (False, True)
] + [
    ("llama-small", dict(method="lora", dtype="bfloat16", micro_batch=2, seq_len=256, r=16, optimizer="adamw_8bit")),
    ("llama-small", dict(method="full", dtype="float32", micro_batch=1, seq_len=256, optimizer="adamw_8bit")),
    ("qwen2-small", dict(method="qlora", dtype="bfloat16", micro_batch=2, seq_len=256, r=16,
                         optimizer="paged_adamw_8bit")),
]
# LoRA over an 8-bit LLM.int8 base (load_in_8bit): estimated with the constants fitted above, never fitted
# themselves. `--rows int8` writes estimate_vs_measured_int8.json.
INT8_ROWS = [
    ("llama-small", dict(method="lora", eight_bit=True, dtype="float32", micro_batch=2, seq_len=256, r=16,
                         gradient_checkpointing=ckpt)) for ckpt in (False, True)
] + [("llama-small", dict(method="lora", eight_bit=True, dtype="bfloat16", micro_batch=2, seq_len=256, r=16))]
# Under torchrun, 2 gloo processes on this CPU (one thread each): one rank's peak against the estimate per rank,
# DDP (a replica + its gradient buckets) and FSDP2 (shards + the gathered root and layers; sharded 4-bit and
# 8-bit codes), tied and untied heads, fp32 and bf16, with and without checkpointing. Never fitted. `--rows distributed` writes
# estimate_vs_measured_distributed.json.
DISTRIBUTED_ROWS = [
    (shape, dict(settings, nproc=2, fsdp=fsdp)) for shape, settings in [
        ("llama-small", dict(method="lora", dtype="float32", micro_batch=2, seq_len=128, r=8)),
        ("llama-tiny", dict(method="lora", dtype="bfloat16", micro_batch=2, seq_len=256, r=16)),
        ("qwen2-small", dict(method="lora", dtype="float32", micro_batch=2, seq_len=128, r=8,
                             gradient_checkpointing=True)),
        ("h-llama-untied", dict(method="lora", dtype="float32", micro_batch=4, seq_len=128, r=8, targets=QV)),
    ] for fsdp in (False, True)
] + [  # QLoRA under FSDP2: the 4-bit codes and absmax sharded, gathered per layer, dequantized in forward and backward
    ("llama-small", dict(method="qlora", dtype=dtype, micro_batch=2, seq_len=128, r=8, nproc=2, fsdp=True))
    for dtype in ("float32", "bfloat16")
] + [("llama-small", dict(method="lora", eight_bit=True, dtype="float32", micro_batch=2, seq_len=128, r=8, nproc=2,
                          fsdp=True))]  # an 8-bit base: int8 codes and row scales sharded
# Preference training (rl): a micro-batch of pairs as one forward of chosen and rejected rows, the reference pass
# (the adapter switched off, no autograd) before it; KTO's rows with their KL rows. Prompt and answer half the
# sequence each. Estimated with the constants fitted above, never fitted. `--rows preference` writes
# estimate_vs_measured_preference.json.
PREFERENCE_ROWS = [
    ("llama-small", dict(method="lora", rl="dpo", dtype="float32", micro_batch=4, seq_len=256, r=16, dropout=0.0)),
    ("llama-small", dict(method="lora", rl="dpo", dtype="bfloat16", micro_batch=4, seq_len=256, r=16, dropout=0.0,
                         gradient_checkpointing=True)),
    ("qwen2-small", dict(method="lora", rl="dpo", dtype="bfloat16", micro_batch=2, seq_len=512, r=8, dropout=0.0)),
    ("llama-small", dict(method="qlora", rl="dpo", dtype="float32", micro_batch=4, seq_len=256, r=16, dropout=0.0)),
    ("llama-small", dict(method="lora", rl="orpo", dtype="float32", micro_batch=4, seq_len=256, r=16, dropout=0.0)),
    ("h-llama-untied", dict(method="full", rl="orpo", dtype="bfloat16", micro_batch=2, seq_len=256)),
    ("llama-small", dict(method="lora", rl="kto", dtype="float32", micro_batch=2, seq_len=256, r=16, dropout=0.0)),
    ("qwen2-small", dict(method="lora", rl="kto", dtype="bfloat16", micro_batch=4, seq_len=256, r=8, dropout=0.0,
                         gradient_checkpointing=True)),
    # the head trained whole: the reference reads a frozen copy of it as it started
    ("llama-small", dict(method="lora", rl="dpo", dtype="float32", micro_batch=2, seq_len=256, r=8, dropout=0.0,
                         modules_to_save=["lm_head"])),
    ("h-llama-tied", dict(method="lora", rl="dpo", dtype="float32", micro_batch=2, seq_len=256, r=8, dropout=0.0,
                          modules_to_save=["lm_head"])),  # a wider head: 32k × 512
    ("h-llama-tied", dict(method="lora", rl="kto", dtype="bfloat16", micro_batch=2, seq_len=256, r=8, dropout=0.0,
                          modules_to_save=["lm_head"])),
]
# GPU rows (scripts/gpu_check.sh): the real Llama 3.2 1B shape, random weights.
CUDA_ROWS = [
    ("llama-3.2-1b", dict(method="lora", dtype="bfloat16", micro_batch=2, seq_len=1024, r=16)),
    ("llama-3.2-1b", dict(method="lora", dtype="bfloat16", micro_batch=4, seq_len=2048, r=16, gradient_checkpointing=True)),
    ("llama-3.2-1b", dict(method="full", dtype="bfloat16", micro_batch=1, seq_len=1024)),
    ("llama-3.2-1b", dict(method="lora", dtype="float32", micro_batch=1, seq_len=512, r=8, targets=["q_proj", "v_proj"])),
    ("llama-3.2-1b", dict(method="full", dtype="bfloat16", micro_batch=1, seq_len=1024, optimizer="adamw_torch_fused")),
    ("qwen2-small", dict(method="lora", dtype="bfloat16", micro_batch=4, seq_len=512, r=16)),
    # issue 16 on CUDA: QLoRA (NF4 base, bitsandbytes' CUDA kernels) and bitsandbytes' 8-bit AdamW
    ("llama-3.2-1b", dict(method="qlora", dtype="bfloat16", micro_batch=2, seq_len=1024, r=16)),
    ("llama-3.2-1b", dict(method="qlora", dtype="bfloat16", micro_batch=4, seq_len=2048, r=16, gradient_checkpointing=True)),
    ("llama-3.2-1b", dict(method="full", dtype="bfloat16", micro_batch=1, seq_len=1024, optimizer="adamw_bnb_8bit")),
]


def run_one(shape: str, settings: dict, steps: int, device: str) -> dict:
    """In this process: measure and estimate one row."""
    from lorafit.measure import every_rank, measure
    from lorafit.memory.estimate import Settings, estimate
    from lorafit.memory.spec import resolve_spec

    shapes = {**SHAPES, **HELDOUT_SHAPES}
    spec = resolve_spec(shape) if shape == "demo" or shape not in shapes else shapes[shape]
    s = Settings(**settings, device=device)
    t0 = time.perf_counter()
    m = measure(spec, s, steps, model_name="demo" if shape == "demo" else None, device=device)
    ranks = every_rank(m)  # under torchrun: each rank's peak (the largest is the row's)
    m = max(ranks, key=lambda r: r.peak)
    est = estimate(spec, replace(s, device="cpu"))  # tensor memory only, no CUDA overhead
    row = {"shape": shape, "settings": settings, "device": device, "estimate_bytes": est.allocated_peak,
           "measured_bytes": m.peak, "error_pct": 100.0 * (est.allocated_peak - m.peak) / m.peak,
           "peak_moment": est.peak_moment, "measured_by_kind": m.by_kind, "seconds": time.perf_counter() - t0,
           "model": asdict(spec), "runtime": s.runtime.to_dict()}
    if len(ranks) > 1:
        row["measured_by_rank"] = [r.peak for r in ranks]
    return row


def _print_row(i: int, row: dict) -> None:
    settings = dict(row["settings"])
    ranks = settings.pop("nproc", 1)
    mode = f"{'FSDP2' if settings.pop('fsdp', False) else 'DDP'}×{ranks} " if ranks > 1 else ""
    desc = mode + " ".join(f"{k}={v}" for k, v in settings.items()).replace("method=", "").replace("dtype=", "")
    print(f"{i:>2} {row['shape']:15} {desc[:70]:70} {row['estimate_bytes'] / 2**20:8.1f}M "
          f"{row['measured_bytes'] / 2**20:8.1f}M {row['error_pct']:+6.1f}%", flush=True)


def _summary(results: list[dict]) -> None:
    worst = max(results, key=lambda r: abs(r["error_pct"]))
    print(f"worst row: {worst['shape']} {worst['settings']}: {worst['error_pct']:+.1f}% "
          f"({sum(abs(r['error_pct']) <= 5 for r in results)}/{len(results)} within ±5%, "
          f"{sum(abs(r['error_pct']) <= 10 for r in results)}/{len(results)} within ±10%)")


def reestimate(path: Path) -> int:
    """Rescore stored rows with the current estimator: the measured peaks stay, estimates and errors change."""
    from lorafit.memory.estimate import Settings, estimate
    from lorafit.memory.spec import ModelSpec

    data = json.loads(path.read_text())
    print(f"{'#':>2} {'shape':15} {'settings':70} {'estimate':>9} {'measured':>9} {'error':>7}")
    for i, row in enumerate(data["rows"]):
        # the options the row was measured with (older files record none: this environment's)
        runtime = row.get("runtime") or {}
        s = Settings(**row["settings"], device="cpu", **({"runtime": runtime} if runtime else {}))
        est = estimate(ModelSpec(**row["model"]), s)
        row.update(estimate_bytes=est.allocated_peak, peak_moment=est.peak_moment,
                   error_pct=100.0 * (est.allocated_peak - row["measured_bytes"]) / row["measured_bytes"])
        _print_row(row.get("row", i), row)
    _summary(data["rows"])
    data["reestimated"] = provenance()  # the estimator's code now; the measured peaks keep "provenance"
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"rescored {path}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cuda", action="store_true")
    ap.add_argument("--rows", help="a split (fit | heldout) or comma-separated indices of fit rows")
    ap.add_argument("--split", choices=["fit", "heldout", "qlora", "int8", "distributed", "preference"], default="fit",
                    help="fit: the 22 rows the constants were calibrated on (default); heldout: rows never fitted; "
                         "qlora: 4-bit bases and 8-bit optimizers (never fitted); int8: 8-bit bases (never fitted); distributed: one rank of 2 "
                         "torchrun processes, DDP and FSDP2 (never fitted); preference: rl: dpo / orpo / kto (never fitted)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", help="results JSON (default benchmarks/results/estimate_vs_measured[_cuda].json)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--reestimate", action="store_true",
                    help="recompute estimates and errors of the results JSON from its stored measured peaks")
    args = ap.parse_args()
    device = "cuda" if args.cuda else "cpu"
    if args.rows in ("fit", "heldout", "qlora", "int8", "distributed", "preference"):
        args.split, args.rows = args.rows, None
    heldout = args.split in ("heldout", "qlora", "int8", "distributed", "preference") and not args.cuda
    suffix = "_cuda" if args.cuda else f"_{args.split}" if heldout else ""
    default_name = f"estimate_vs_measured{suffix}.json"
    out = Path(args.out or ROOT / "benchmarks" / "results" / default_name)
    if args.reestimate:
        return reestimate(out)
    if args.one:
        shape, settings = json.loads(args.one)
        row = run_one(shape, settings, args.steps, device)
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun rank 0 prints the row, with every rank's peak
            print(json.dumps(row))
        return 0
    split_rows = {"qlora": QLORA_ROWS, "int8": INT8_ROWS, "distributed": DISTRIBUTED_ROWS, "heldout": HELDOUT_ROWS,
                  "preference": PREFERENCE_ROWS}
    rows = CUDA_ROWS if args.cuda else split_rows[args.split] if heldout else ROWS
    idx = [int(i) for i in args.rows.split(",")] if args.rows else QUICK if args.quick and not args.cuda and not heldout else range(len(rows))
    results = []
    print(f"{'#':>2} {'shape':15} {'settings':70} {'estimate':>9} {'measured':>9} {'error':>7}")
    for i in idx:
        shape, settings = rows[i]
        nproc = settings.get("nproc", 1)
        launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                         f"--nproc-per-node={nproc}"]
        cmd = [*launcher, __file__, "--one", json.dumps([shape, settings]), "--steps", str(args.steps)]
        if args.cuda:
            cmd.append("--cuda")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(f"{i:>2} {shape:15} FAILED: {proc.stderr.strip().splitlines()[-1] if proc.stderr else ''}")
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["row"] = i
        results.append(row)
        _print_row(i, row)
    if results:
        _summary(results)
        if not args.rows and (args.cuda or not args.quick):
            out.parent.mkdir(parents=True, exist_ok=True)
            # the rows' processes resolve their options from this environment (Settings' default)
            split = "cuda" if args.cuda else args.split
            out.write_text(json.dumps({"device": device, "split": split, "provenance": provenance(), "rows": results},
                                      indent=2) + "\n")
            print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
