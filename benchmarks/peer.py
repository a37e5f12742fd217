"""lorafit vs PEFT, side by side: tokens/s, peak memory and loss on the same model, data, seed and settings.

    .venv/bin/python benchmarks/peer.py                 # all CPU configurations (~1 h on a quiet 2-core box)
    .venv/bin/python benchmarks/peer.py --quick         # smoke run: 4-layer shape, few steps (~15 min)
    .venv/bin/python benchmarks/peer.py --profile       # torch.profiler of one step, lorafit and PEFT (1 thread)
    .venv/bin/python benchmarks/peer.py --device cuda   # Llama-3.2-1B shape, torch.cuda.max_memory_allocated

What is timed. lorafit: ``lorafit train`` itself — the :class:`lorafit.train.recipe.Recipe` of a YAML config
written for the run (the random-weight model saved as an HF folder, a completion-format JSONL, the settings
below), with its data pipeline, masks, gradient clipping, metrics log and progress; a step's time is one turn of
the recipe's loop. ``compile_kernels`` is left unset, as a user gets it (``auto``), and the config plans
``--planned-steps`` (100) steps as a user's run would — ``auto`` decides from that — while every run stops after
its own steps (``--compile-kernels`` overrides). ``--with-step`` adds ``lorafit-step``: the same model, optimizer
and batches through ``train_step`` in a bare loop, to show what the recipe around it costs. PEFT: a plain
PyTorch loop (forward with labels, backward, clipping, ``AdamW.step``) and ``transformers.Trainer``, each on the
same saved model and the very token batches lorafit's data pipeline makes of the same file (``peer_worker``).

Every (configuration, implementation) runs in its own process (``peer_worker.py``), lorafit and its peers
alternating (order reversed on every other repeat so drift does not favour one side). lorafit's ratios are
against the *faster* peer. Settings (from issue 5): LoRA r=16, alpha 16, dropout 0.05, all linear layers, batch
4 × 256 tokens (every row full length, every token but the first trained), AdamW lr 1e-4 without weight decay,
constant schedule, gradient clipping 1.0, random-weight model of the given shape (seed 0). Adapters: LoRA;
QLoRA (``*-qlora-*``: the base's linear layers NF4 with double quantization — lorafit ``adapter: qlora`` with
``load_in_4bit``, PEFT over ``transformers`` + ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=<the run's dtype>)`` with ``device_map={"": "cpu"}``;
PEFT's ``prepare_model_for_kbit_training`` is not called: it would upcast the other weights to fp32 and turn on
checkpointing); DoRA (``*-dora-*``: ``peft_use_dora`` / ``use_dora=True``). Time: wall seconds per timed step
and, beside them, the process's CPU seconds per step (on a machine shared with other work the wall time
measures the share of the CPU a run got as much as the run). Memory: ``MemTracker`` peak of one extra step
after the timed ones (tensor bytes, split by kind); RSS high-water over the timed steps (VmHWM reset before
them); ``ru_maxrss`` of the whole process (includes building the model). The ``exact*`` checks: dropout 0,
fp32, the first 20 steps of lorafit and the PEFT loop from the same adapter — the per-step losses must agree
to 1e-5 relative, and the adapters after the steps: each module's ``B @ A`` to 1e-3 and each matrix's update
(trained minus initial weights) to 3e-3 relative (Frobenius norm of the difference over PEFT's). Both are
printed. A wrong update breaks the weight bounds (a learning rate 1% off moves both by ~1e-2):
``--exact-lr-scale 1.01`` shows it. Every results file records its provenance (``benchmarks/provenance.py``:
commit, CPU and flags, threads, versions, lorafit's runtime options) and the load average at the start and
end of each run. Writes ``benchmarks/results/peer.json`` (``peer_cuda.json`` on CUDA, ``peer_profile.json`` for
``--profile``) after every run, so a run cut short keeps what finished.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import provenance

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "peer_worker.py"
RESULTS = HERE / "results"
RESULT_TAG = "PEER_RESULT "
IMPLS = ("lorafit", "lorafit-step", "peft-loop", "peft-trainer")
PEERS = ("peft-loop", "peft-trainer")
EXACT_RTOL = 1e-5  # per-step losses, relative (measured 1e-7 to 3e-7: at lr 1e-4 on random tokens the loss
# hardly moves, so the losses alone cannot tell a wrong update from a right one; the weights can)
# Adapter weights after the steps (see adapter_diff), relative Frobenius differences. A learning rate 1% off
# makes both ~1e-2. Measured on the 4-layer 135M shape (AVX2, 1 thread): B @ A per module 7.9e-5 after 20
# steps; the update of an A matrix 2.9e-4 after 20 steps, 6.1e-4 after 5 (A's first non-zero Adam step, while B
# is still ~0, is nearly lr·sign(grad): rounding in a near-zero gradient moves it by a whole step).
EXACT_DELTA_RTOL = 1e-3  # per module, B @ A
EXACT_UPDATE_RTOL = 3e-3  # per matrix, trained minus initial weights
MiB = 1024**2

CPU_CONFIGS = {
    "135m-fp32": dict(shape="smollm2-135m", dtype="float32", gc=False),
    "135m-bf16": dict(shape="smollm2-135m", dtype="bfloat16", gc=False),
    "135m-fp32-gc": dict(shape="smollm2-135m", dtype="float32", gc=True),
    "135m-bf16-gc": dict(shape="smollm2-135m", dtype="bfloat16", gc=True),
    "135m-4layers-fp32": dict(shape="smollm2-135m", layers=4, dtype="float32", gc=False),
    "exact": dict(shape="smollm2-135m", dtype="float32", gc=False, exact=True),
    # issue 16: the base's linear layers NF4 with double quantization (PEFT: transformers + bitsandbytes)
    "135m-qlora-fp32": dict(shape="smollm2-135m", dtype="float32", gc=False, adapter="qlora"),
    "135m-qlora-bf16": dict(shape="smollm2-135m", dtype="bfloat16", gc=False, adapter="qlora"),
    "exact-qlora": dict(shape="smollm2-135m", dtype="float32", gc=False, exact=True, adapter="qlora"),
    # issue 17: DoRA (peft_use_dora / PEFT's use_dora)
    "135m-dora-fp32": dict(shape="smollm2-135m", dtype="float32", gc=False, adapter="dora"),
    "exact-dora": dict(shape="smollm2-135m", dtype="float32", gc=False, exact=True, adapter="dora"),
}
CUDA_CONFIGS = {
    "1b-bf16": dict(shape="llama-3.2-1b", dtype="bfloat16", gc=False),
    "1b-bf16-gc": dict(shape="llama-3.2-1b", dtype="bfloat16", gc=True),
    "1b-fp32": dict(shape="llama-3.2-1b", dtype="float32", gc=False),
    "exact": dict(shape="llama-3.2-1b", dtype="float32", gc=False, exact=True),
    "1b-qlora-bf16": dict(shape="llama-3.2-1b", dtype="bfloat16", gc=False, adapter="qlora"),
    "exact-qlora": dict(shape="llama-3.2-1b", layers=2, dtype="float32", gc=False, exact=True, adapter="qlora"),
}
QUICK_CONFIGS = {
    "135m-4layers-fp32": CPU_CONFIGS["135m-4layers-fp32"],
    "135m-4layers-bf16": dict(shape="smollm2-135m", layers=4, dtype="bfloat16", gc=False),
    "exact-4layers": dict(shape="smollm2-135m", layers=4, dtype="float32", gc=False, exact=True),
    "4layers-qlora-fp32": dict(shape="smollm2-135m", layers=4, dtype="float32", gc=False, adapter="qlora"),
    "exact-4layers-qlora": dict(shape="smollm2-135m", layers=4, dtype="float32", gc=False, exact=True,
                                adapter="qlora"),
    "4layers-dora-fp32": dict(shape="smollm2-135m", layers=4, dtype="float32", gc=False, adapter="dora"),
    "exact-4layers-dora": dict(shape="smollm2-135m", layers=4, dtype="float32", gc=False, exact=True,
                               adapter="dora"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shape, few steps: a smoke run")
    p.add_argument("--configs", help="comma-separated configuration names (default: all for the device)")
    p.add_argument("--peers", default=",".join(PEERS), help="PEFT peers to run: peft-loop,peft-trainer")
    p.add_argument("--with-step", action="store_true",
                   help="also run lorafit-step (train_step in a bare loop) in the LoRA configurations: what the recipe "
                        "around it costs")
    p.add_argument("--planned-steps", type=int, default=100,
                   help="max_steps of the lorafit config: the run a user plans (compile_kernels: auto decides from "
                        "it); every run stops after its own steps (default 100)")
    p.add_argument("--compile-kernels", choices=("auto", "true", "false"),
                   help="compile_kernels in the lorafit config (default: not set, as a user gets it)")
    p.add_argument("--warmup", type=int, help="untimed steps per run (default 2; quick 1)")
    p.add_argument("--steps", type=int, help="timed steps per run (default 5; quick 2)")
    p.add_argument("--exact-steps", type=int, help="steps of the exactness check (default 20; quick 5)")
    p.add_argument("--adapter-dir", type=Path, help="keep the exactness runs' adapters here (default: a temporary "
                   "folder, removed)")
    p.add_argument("--exact-lr-scale", type=float, default=1.0,
                   help="scale lorafit's learning rate in the exactness check (1.01: a wrong update it must catch)")
    p.add_argument("--repeats", type=int, default=1, help="runs per (configuration, implementation); median taken")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per run")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, help="sequence length (default 256; cuda 1024)")
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--tokenizer", default="demo",
                   help="the tokenizer saved with the random-weight model: 'demo' (SmolLM2's, from the demo package) or "
                        "a folder holding its files (a machine without the demo package: copy them there)")
    p.add_argument("--no-memory", action="store_true", help="skip the MemTracker step")
    p.add_argument("--profile", action="store_true", help="profile one step of lorafit and peft-loop instead")
    p.add_argument("--out", type=Path, help="JSON output path")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per run before it is killed")
    return p.parse_args(argv)


# --- running ------------------------------------------------------------------------------------------
def run_one(spec: dict, timeout: int) -> dict:
    env = dict(os.environ)
    threads = str(spec["threads"])
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", ""))
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(WORKER), json.dumps(spec)], capture_output=True, text=True,
                              env=env, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"impl": spec["impl"], "spec": spec, "error": f"timed out after {timeout} s", "loadavg_1m": load}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG):])
            res["loadavg_1m"] = load
            res["process_s"] = time.perf_counter() - t0
            return res
    tail = (proc.stderr or proc.stdout)[-3000:]
    return {"impl": spec["impl"], "spec": spec, "error": f"exit {proc.returncode}: {tail}", "loadavg_1m": load}


def seq_len(args) -> int:
    return args.seq or (1024 if args.device == "cuda" else 256)


def workspace_key(cfg: dict) -> str:
    return f"{cfg['shape']}-{cfg.get('layers') or 'all'}"


def base_spec(args, name: str, cfg: dict, impl: str) -> dict:
    exact = cfg.get("exact", False)
    seq = seq_len(args)
    compile_kernels = {"auto": "auto", "true": True, "false": False}.get(getattr(args, "compile_kernels", None))
    return {
        "config": name, "impl": impl, "adapter": cfg.get("adapter", "lora"),
        "workspace": getattr(args, "workspaces", {}).get(workspace_key(cfg)),
        "planned_steps": args.planned_steps, "compile_kernels": compile_kernels,
        "shape": cfg["shape"], "layers": cfg.get("layers"), "dtype": cfg["dtype"],
        "gc": cfg["gc"], "batch": args.batch, "seq": seq, "r": 16, "alpha": 16,
        "dropout": 0.0 if exact else args.dropout, "seed": 0, "threads": args.threads, "device": args.device,
        "warmup": 0 if exact else args.warmup, "steps": args.exact_steps if exact else args.steps,
        "memory": not (exact or args.no_memory), "profile": False, "floor": not exact and impl == "lorafit",
        **({"adapter_out": str(Path(args.adapter_dir) / f"{name}-{impl}.safetensors")}
           if exact and getattr(args, "adapter_dir", None) else {}),
        **({"lr_scale": args.exact_lr_scale} if exact and impl == "lorafit" and args.exact_lr_scale != 1.0 else {}),
    }


def plan(args, configs: dict) -> list[dict]:
    peers = [p for p in args.peers.split(",") if p]
    runs = []
    for name, cfg in configs.items():
        impls = ["lorafit", "peft-loop"] if cfg.get("exact") else \
            ["lorafit", *(["lorafit-step"] if args.with_step and cfg.get("adapter", "lora") == "lora" else []), *peers]
        for rep in range(1 if cfg.get("exact") else args.repeats):
            for impl in impls if rep % 2 == 0 else impls[::-1]:
                runs.append({**base_spec(args, name, cfg, impl), "repeat": rep})
    return runs


# --- summarising --------------------------------------------------------------------------------------
def _loss_after(res: dict) -> float | None:
    n = res["spec"]["warmup"] + res["spec"]["steps"]
    return res["losses"][n - 1] if len(res.get("losses", [])) >= n else None


def summarise(results: list[dict]) -> dict:
    by = {}
    for r in results:
        by.setdefault(r["spec"]["config"], {}).setdefault(r["impl"], []).append(r)
    summary = {}
    for config, impls in by.items():
        row = {}
        for impl, runs in impls.items():
            ok = [r for r in runs if "error" not in r]
            if not ok:
                row[impl] = {"error": runs[0]["error"][-500:]}
                continue
            first = ok[0]
            tps = [r["tokens_per_s"] for r in ok if r.get("tokens_per_s")]
            cps = [r["tokens_per_cpu_s"] for r in ok if r.get("tokens_per_cpu_s")]
            mem = first.get("memory") or {}
            rss = first.get("rss") or {}
            row[impl] = {
                "tokens_per_s": statistics.median(tps) if tps else None,
                "tokens_per_s_runs": tps,
                "step_s_median": statistics.median([s for r in ok for s in r["step_s"]]) if tps else None,
                "tokens_per_cpu_s": statistics.median(cps) if cps else None,
                "step_cpu_s_median": statistics.median([s for r in ok for s in r["step_cpu_s"]]) if cps else None,
                "memtracker_peak": mem.get("peak"), "memtracker_by_kind": mem.get("by_kind"),
                "block0_saved_activations": mem.get("block0_saved_activations"),
                "rss_timed_peak": rss.get("timed_hwm_kib", 0) * 1024 if rss.get("hwm_reset") else None,
                "rss_before_timed": (rss.get("before_timed_kib") or 0) * 1024,
                "ru_maxrss": first["ru_maxrss_kib"] * 1024,
                "cuda_max_allocated": first.get("cuda_max_allocated"),
                "loss_after_n": _loss_after(first), "losses": first["losses"], "floor": first.get("floor"),
                "loadavg_1m": [r.get("loadavg_1m") for r in ok],
            }
        summary[config] = {"impls": row, **compare(config, row, impls)}
    return summary


def compare(config: str, row: dict, impls: dict) -> dict:
    lf = row.get("lorafit", {})
    peers = {k: v for k, v in row.items() if not k.startswith("lorafit") and v.get("tokens_per_s")}
    out = {}
    spec = next(iter(impls.values()))[0]["spec"]
    if spec["warmup"] == 0 and spec["dropout"] == 0.0 and "peft-loop" in row and lf.get("losses"):
        a, b = lf["losses"], row["peft-loop"].get("losses") or []
        rel = [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=False)]
        files = {r["impl"]: r["spec"].get("adapter_out") for rs in impls.values() for r in rs if "error" not in r}
        weights = adapter_diff_files(files.get("lorafit"), files.get("peft-loop"))
        losses_ok = bool(rel) and len(rel) == spec["steps"] and max(rel) <= EXACT_RTOL
        weights_ok = (weights is not None and "error" not in weights and weights["same_init"]
                      and weights["max_delta_rel"] <= EXACT_DELTA_RTOL
                      and weights["max_update_rel"] <= EXACT_UPDATE_RTOL)
        lorafit_spec = next((r["spec"] for r in impls.get("lorafit", [])), {})
        out["exact"] = {"steps": len(rel), "max_rel_diff": max(rel) if rel else None, "rtol": EXACT_RTOL,
                        "losses_passed": losses_ok, "weights": weights, "delta_rtol": EXACT_DELTA_RTOL,
                        "update_rtol": EXACT_UPDATE_RTOL,
                        "weights_passed": weights_ok, "passed": losses_ok and weights_ok,
                        "lorafit_lr_scale": lorafit_spec.get("lr_scale", 1.0)}
        return out
    if not peers or not lf.get("tokens_per_s"):
        return out
    faster = max(peers, key=lambda k: peers[k]["tokens_per_s"])
    p = peers[faster]

    def ratio(key, peer=p):
        return lf[key] / peer[key] if lf.get(key) and peer.get(key) else None

    out["faster_peer"] = faster
    out["ratios"] = {"tokens_per_s": ratio("tokens_per_s"), "tokens_per_cpu_s": ratio("tokens_per_cpu_s"),
                     "memtracker_peak": ratio("memtracker_peak"),
                     "rss_timed_peak": ratio("rss_timed_peak"), "ru_maxrss": ratio("ru_maxrss"),
                     "cuda_max_allocated": ratio("cuda_max_allocated")}
    out["ratios_vs"] = {k: {"tokens_per_s": ratio("tokens_per_s", v), "tokens_per_cpu_s": ratio("tokens_per_cpu_s", v),
                            "memtracker_peak": ratio("memtracker_peak", v)} for k, v in peers.items()}
    step = row.get("lorafit-step", {})
    if step.get("step_s_median") and lf.get("step_s_median"):  # what the recipe around train_step costs
        out["recipe_vs_step"] = {"step_s": lf["step_s_median"] / step["step_s_median"],
                                 "step_cpu_s": (lf["step_cpu_s_median"] / step["step_cpu_s_median"]
                                                if lf.get("step_cpu_s_median") and step.get("step_cpu_s_median")
                                                else None)}
    return out


def adapter_diff(ours: dict, theirs: dict) -> dict:
    """How far adapter ``ours`` is from ``theirs`` (``{"<module>.A": final, "<module>.A.init": initial, …}``, as
    ``peer_worker`` writes them), in relative Frobenius norms (the largest over matrices or modules, and where):

    * ``update``: per matrix, of the update (trained minus initial weights: what training wrote);
    * ``weight``: per matrix, of the final weights;
    * ``delta``: per module, of ``B @ A`` (the change the adapter makes to the layer's weight, up to the
      scaling both sides share).
    """
    keys = sorted(k for k in theirs if not k.endswith(".init"))
    if not keys or set(keys) != {k for k in ours if not k.endswith(".init")}:
        return {"error": "the two adapters have different matrices", "matrices": len(keys)}

    def rel(x, y):
        return ((x - y).norm() / y.norm().clamp_min(1e-30)).item()

    upd, wt, delta, moved, max_abs = {}, {}, {}, {}, 0.0
    for k in keys:
        x, y, x0, y0 = ours[k].double(), theirs[k].double(), ours[k + ".init"].double(), theirs[k + ".init"].double()
        upd[k], wt[k], moved[k] = rel(x - x0, y - y0), rel(x, y), rel(y, y0)
        max_abs = max(max_abs, (x - y).abs().max().item())
    for m in sorted({k[:-2] for k in keys}):
        delta[m] = rel(ours[m + ".B"].double() @ ours[m + ".A"].double(),
                       theirs[m + ".B"].double() @ theirs[m + ".A"].double())

    def worst(d: dict, suffix: str = "") -> tuple[float, str]:
        k = max((k for k in d if k.endswith(suffix)), key=d.get)
        return d[k], k

    out = {"matrices": len(keys), "modules": len(delta), "max_abs_diff": max_abs,
           "same_init": all(ours[k + ".init"].equal(theirs[k + ".init"]) for k in keys),
           "min_moved_rel": min(moved.values())}  # how far PEFT's least-moved matrix went from its start
    for name, d in (("update", upd), ("weight", wt), ("delta", delta)):
        out[f"max_{name}_rel"], out[f"worst_{name}"] = worst(d)
    for part in ("A", "B"):
        out[f"max_update_rel_{part}"], _ = worst(upd, "." + part)
        out[f"max_weight_rel_{part}"], _ = worst(wt, "." + part)
    return out


def adapter_diff_files(ours: str | None, theirs: str | None) -> dict | None:
    """:func:`adapter_diff` of two files written by ``peer_worker`` (None when either is missing)."""
    if not (ours and theirs and Path(ours).is_file() and Path(theirs).is_file()):
        return None
    from safetensors.torch import load_file

    return adapter_diff(load_file(ours), load_file(theirs))


def _mib(x):
    return f"{x / MiB:,.0f}" if x else "–"


def _x(x):
    return f"{x:.2f}×" if x else "–"


def print_table(summary: dict, device: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="lorafit vs PEFT (ratios: lorafit / faster PEFT peer)", show_lines=False)
    for col in ("config", "impl", "tok/s", "s/step", "CPU s/step", "floor tok/s",
                "CUDA peak MiB" if device == "cuda" else "MemTracker MiB", "act MiB", "RSS steps MiB",
                "ru_maxrss MiB", "loss@N", "tok/s ×", "mem ×", "RSS ×"):
        t.add_column(col, justify="left" if col in ("config", "impl") else "right")
    for config, s in summary.items():
        if "exact" in s:
            continue
        for i, (impl, r) in enumerate(sorted(s["impls"].items(), key=lambda kv: IMPLS.index(kv[0]))):
            if "error" in r:
                t.add_row(config if i == 0 else "", impl, "error", *[""] * 11)
                continue
            ratios = s.get("ratios", {}) if impl == "lorafit" else {}
            floor = r.get("floor") or {}
            peak = r["cuda_max_allocated"] if device == "cuda" else r["memtracker_peak"]
            act = (r.get("memtracker_by_kind") or {}).get("Activation")
            mem_ratio = ratios.get("cuda_max_allocated" if device == "cuda" else "memtracker_peak")
            t.add_row(config if i == 0 else "", impl + (" *" if impl == s.get("faster_peer") else ""),
                      f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "–",
                      f"{r['step_s_median']:.2f}" if r["step_s_median"] else "–",
                      f"{r['step_cpu_s_median']:.2f}" if r.get("step_cpu_s_median") else "–",
                      f"{floor['floor_tokens_per_s']:.0f}" if floor else "", _mib(peak), _mib(act),
                      _mib(r["rss_timed_peak"]), _mib(r["ru_maxrss"]),
                      f"{r['loss_after_n']:.5f}" if r["loss_after_n"] is not None else "–",
                      _x(ratios.get("tokens_per_s")), _x(mem_ratio), _x(ratios.get("rss_timed_peak")))
        t.add_section()
    console = Console(width=200)
    console.print(t)
    console.print("* faster PEFT peer. MemTracker: tensor bytes at the peak of one step; act: activations at that "
                  "peak; RSS steps: process RSS high-water over the timed steps; ru_maxrss includes model building.")
    for config, s in summary.items():
        if s.get("recipe_vs_step"):
            v = s["recipe_vs_step"]
            cpu = f", CPU time {v['step_cpu_s']:.2f}×" if v.get("step_cpu_s") else ""
            console.print(f"{config}: lorafit train's step (the recipe) / train_step in a bare loop: wall {v['step_s']:.2f}×"
                          f"{cpu}", highlight=False)
    for config, s in summary.items():
        if "exact" in s:
            e = s["exact"]
            verdict = "[green]PASS[/]" if e["passed"] else "[red]FAIL[/]"
            diff = f"{e['max_rel_diff']:.2e}" if e["max_rel_diff"] is not None else "n/a"
            w = e.get("weights") or {}
            scale = f", lorafit lr × {e['lorafit_lr_scale']:g}" if e.get("lorafit_lr_scale", 1.0) != 1.0 else ""
            console.print(f"exactness ({config}): dropout 0, fp32, {e['steps']} steps{scale}, lorafit vs peft-loop: "
                          f"losses max relative difference {diff} (bound {e['rtol']:g}); ", highlight=False, end="")
            if "max_update_rel" in w:
                console.print(f"adapters after the steps: B @ A max relative difference {w['max_delta_rel']:.2e} "
                              f"(bound {e['delta_rtol']:g}; {w['worst_delta']}), updates {w['max_update_rel']:.2e} "
                              f"(bound {e['update_rtol']:g}; {w['worst_update']}), final weights "
                              f"{w['max_weight_rel']:.2e} relative / {w['max_abs_diff']:.2e} absolute "
                              f"({w['matrices']} matrices{'' if w['same_init'] else ', DIFFERENT initial adapters'}) "
                              f"{verdict}", highlight=False)
            else:
                console.print(f"adapter weights not compared ({w.get('error', 'no adapter files')}) {verdict}",
                              highlight=False)


def _cpu_flags() -> list[str]:
    try:
        flags = next(line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512_fp16")))


def machine_info(args) -> dict:
    import torch

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "peft", "accelerate"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip()
    except OSError:
        commit = ""
    # The vector unit PyTorch dispatches to and the CPU's AMX/bf16 flags: without AMX, bf16 matmuls can run
    # slower than fp32 ones, which changes every bf16 row of the table.
    info = {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_flags": _cpu_flags(),
            "cpu_count": os.cpu_count(), "threads": args.threads, "device": args.device,
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "loadavg_start": os.getloadavg(),
            "commit": commit, "versions": versions}
    if args.device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def strip(res: dict) -> dict:
    res = dict(res)
    if "profile" in res:
        res["profile"] = {k: v for k, v in res["profile"].items() if k != "table"}
    return res


def make_workspaces(args, configs: dict, folder: Path) -> dict:
    """One workspace per model shape in ``configs`` (``peer_worker.write_workspace``: the random-weight model as an
    HF folder and the completion JSONL), rows enough for the longest run."""
    sys.path.insert(0, str(ROOT / "src"))
    import peer_worker

    rows = args.batch * (max(args.warmup + args.steps, args.exact_steps) + 3)
    out = {}
    for cfg in configs.values():
        key = workspace_key(cfg)
        if key not in out:
            spec = {"shape": cfg["shape"], "layers": cfg.get("layers"), "seed": 0, "tokenizer": args.tokenizer}
            out[key] = peer_worker.write_workspace(folder / key, spec, rows)
    return out


def run_profile(args) -> None:
    out = args.out or RESULTS / f"peer_profile{'' if not args.configs else '_' + args.configs.split(',')[0]}.json"
    known = {**CPU_CONFIGS, **QUICK_CONFIGS, **CUDA_CONFIGS}
    name = (args.configs or ("135m-fp32" if args.device == "cpu" else "1b-bf16")).split(",")[0]
    cfg = {**known[name], "exact": False}
    results = []
    with tempfile.TemporaryDirectory(prefix="peer-") as tmp:
        args.workspaces = make_workspaces(args, {name: cfg}, Path(tmp))
        for impl in ("lorafit", "peft-loop"):
            spec = {**base_spec(args, "profile", cfg, impl), "warmup": 1, "steps": 1, "profile": True,
                    "memory": args.device == "cpu" and not args.no_memory, "floor": False}
            print(f"profiling {impl} ({spec['threads']} thread(s)) …", flush=True)
            res = run_one(spec, args.timeout)
            if "error" in res:
                print(res["error"])
                continue
            print(f"\n=== {impl}: one step under the profiler took {res['profile']['wall_s']:.2f} s "
                  f"(unprofiled: {res['step_s'][0]:.2f} s)")
            print(res["profile"]["table"])
            if res.get("memory"):
                m = res["memory"]
                print("MemTracker peak by kind (MiB):",
                      {k: round(v / MiB, 1) for k, v in m["by_kind"].items()},
                      "| block 0 saved activations:", _mib(m.get("block0_saved_activations")), "MiB")
            results.append(strip(res))
    del args.workspaces
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine_info(args), "provenance": provenance(threads=args.threads), "runs": results}
    out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {out}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.steps is None:
        args.steps = 2 if args.quick else 5
    if args.exact_steps is None:
        args.exact_steps = 5 if args.quick else 20
    if args.profile:
        if args.threads == (os.cpu_count() or 1) and args.device == "cpu":
            args.threads = 1
        run_profile(args)
        return 0
    table = CUDA_CONFIGS if args.device == "cuda" else (QUICK_CONFIGS if args.quick else CPU_CONFIGS)
    if args.configs:
        # the device's own table wins: "exact" is a 135M shape on CPU and a 1B shape on CUDA
        known = ({**CPU_CONFIGS, **QUICK_CONFIGS, **CUDA_CONFIGS} if args.device == "cuda"
                 else {**CUDA_CONFIGS, **QUICK_CONFIGS, **CPU_CONFIGS})
        unknown = [c for c in args.configs.split(",") if c not in known]
        if unknown:
            print(f"unknown configuration(s) {unknown}; known: {', '.join(known)}", file=sys.stderr)
            return 2
        table = {c: known[c] for c in args.configs.split(",")}
    out = args.out or RESULTS / ("peer_cuda.json" if args.device == "cuda" else "peer.json")
    info = machine_info(args)
    prov = provenance(threads=args.threads)  # the workers resolve their options from this environment
    results, t_start = [], time.perf_counter()
    keep = args.adapter_dir
    if keep:
        keep.mkdir(parents=True, exist_ok=True)

    def save(runs_total: int) -> dict:
        """Write what has finished so far (every run rewrites the file: a cut-short run keeps its results)."""
        summary = summarise(results)  # reads the adapter files
        info["wall_s"] = time.perf_counter() - t_start
        info["loadavg_end"] = os.getloadavg()
        info["runs_done"], info["runs_planned"] = len(results), runs_total
        recorded = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "workspaces"}
        recorded["adapter_dir"] = str(keep) if keep else None
        payload = {"machine": info, "provenance": prov, "args": recorded, "summary": summary,
                   "runs": [strip(r) for r in results]}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=1) + "\n")
        return summary

    with tempfile.TemporaryDirectory(prefix="peer-") as tmp:
        args.adapter_dir = keep or tmp  # the exactness runs write their adapters here; compared in summarise
        print("writing the model and data every side reads …", flush=True)
        args.workspaces = make_workspaces(args, table, Path(tmp))
        runs = plan(args, table)
        print(f"{len(runs)} runs, {args.threads} thread(s), CPU capability {info['cpu_capability']} "
              f"{' '.join(info['cpu_flags'])}, load average {info['loadavg_start'][0]:.2f}", flush=True)
        for i, spec in enumerate(runs, 1):
            res = run_one(spec, args.timeout)
            results.append(res)
            what = f"[{i}/{len(runs)}] {spec['config']:<18} {spec['impl']:<13}"
            if "error" in res:
                print(f"{what} ERROR {res['error'][-800:]}", flush=True)
            else:
                tps = f"{res['tokens_per_s']:.0f} tok/s" if res.get("tokens_per_s") else ""
                print(f"{what} {tps:>12}  ({res['process_s']:.0f} s, load {res['loadavg_1m']:.2f})", flush=True)
            summary = save(len(runs))
    print_table(summary, args.device)
    print(f"wrote {out} in {info['wall_s'] / 60:.1f} min")
    failed = any("error" in r for r in results) or any(not s["exact"]["passed"] for s in summary.values() if "exact" in s)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
