"""bf16 GEMM vs the same GEMM on fp32 copies, on this CPU: what ``lorafit.options`` decides from the CPU's flags.

Times ``F.linear`` over the 135M model's LoRA-layer shapes (1024 tokens) in bf16, and on fp32 copies of the bf16
operands rounded back to bf16 (the copies included), with preallocated buffers (the steady state of a training
step). Prints a table of ratios and writes JSON.

    .venv/bin/python benchmarks/half_matmul.py [--threads 2] [--out benchmarks/results/half_matmul.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from provenance import provenance

from lorafit.options import RuntimeOptions, cpu_flags

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(1024, 576, 576), (1024, 576, 192), (1024, 576, 1536), (1024, 1536, 576)]  # tokens, in, out


def best_time(fn, warmup: int = 5, repeats: int = 20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def time_shape(tokens: int, d_in: int, d_out: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d_in, generator=gen).bfloat16()
    w = torch.randn(d_out, d_in, generator=gen).bfloat16()
    x32, w32, y32 = torch.empty(x.shape), torch.empty(w.shape), torch.empty(tokens, d_out)
    y, y16 = torch.empty(tokens, d_out, dtype=torch.bfloat16), torch.empty(tokens, d_out, dtype=torch.bfloat16)

    def upcast():
        torch.mm(x32.copy_(x), w32.copy_(w).t(), out=y32)
        y16.copy_(y32)

    native = best_time(lambda: torch.mm(x, w.t(), out=y))
    fp32 = best_time(upcast)
    flops = 2 * tokens * d_in * d_out
    return {"shape": [tokens, d_in, d_out], "bf16_ms": native * 1e3, "fp32_copies_ms": fp32 * 1e3,
            "bf16_gflops": flops / native / 1e9, "fp32_copies_gflops": flops / fp32 / 1e9, "ratio": fp32 / native}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/half_matmul.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [time_shape(*s) for s in SHAPES]
    print(f"{'tokens × in × out':>20} {'bf16 ms':>9} {'fp32 copies ms':>15} {'copies / bf16':>14}")
    for r in rows:
        print(f"{' × '.join(map(str, r['shape'])):>20} {r['bf16_ms']:9.2f} {r['fp32_copies_ms']:15.2f} {r['ratio']:13.2f}×")
    runtime = RuntimeOptions.resolve()
    choice = "fp32 copies" if runtime.upcasts("bfloat16", "cpu") else "native bf16"
    faster = "fp32 copies" if sum(r["fp32_copies_ms"] for r in rows) < sum(r["bf16_ms"] for r in rows) else "native bf16"
    print(f"faster here: {faster}; lorafit picks (half_matmul={runtime.half_matmul}, from the CPU flags): {choice}")
    flags = cpu_flags()
    cpu = {"capability": torch.backends.cpu.get_cpu_capability(), "amx": "amx_tile" in flags,
           "avx512_bf16": "avx512_bf16" in flags, "threads": args.threads}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu, "rows": rows, "faster": faster, "lorafit_picks": choice,
                                    "provenance": provenance(runtime)}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
