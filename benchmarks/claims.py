"""The article's claims about LoRA, measured on SmolLM2-135M-Instruct and the demo task (date normalisation).

Claims checked: LoRA (1) saves memory, (2) forgets less of what the model knew, (3) works with little data,
(4) a small rank suits an easy task (16-64 for harder ones). Full fine-tuning and LoRA at several ranks are
trained on the same token budget (same steps x micro-batch) at two training-set sizes; each run reports the
steady-state peak memory of training (torch's MemTracker over 3 steps with the optimizer's state live, split by
kind — the same measurement as ``lorafit measure`` — plus process peak RSS), tokens/s, trainable parameters, adapter / checkpoint size on disk, held-out exact match and retention
(``lorafit.eval.tasks.retention_score``: accuracy and perplexity of the base model's own answers), next to the
base model's. QLoRA (r=8 over the base in NF4, ``q8``) is reported beside LoRA of the same rank, apart from the
claims, which compare plain LoRA with full fine-tuning.

    python benchmarks/claims.py            # full: 6 methods x 2 sizes, LR sweeps (~60 min at 1 thread)
    python benchmarks/claims.py --quick    # full FT vs r=8 vs r=64 vs QLoRA r=8, one size, fixed LRs
    python benchmarks/claims.py --smoke    # 2 methods, 3 steps, 10 held-out rows            (~2 min)
    python benchmarks/claims.py --resume   # continue: skip runs already in the JSON file
    python benchmarks/claims.py --repeats 3   # timed repeats per cell (default 2)
    python benchmarks/claims.py --report-only # rewrite claims.md / claims.png from claims.json

Design (see also the generated markdown):
- alpha is fixed at 16 for every rank. With Adam, the first update of ``s * B @ A`` grows with ``s * r``;
  alpha = 2r would make r = 64 take steps 16x larger than r = 4 at the same learning rate, so a rank
  comparison would mostly compare step sizes. With alpha fixed, ``s * r`` = 16 at every rank and the
  comparison is about capacity.
- Learning rates: full mode sweeps 3 per kind on a short budget (20 steps, training rows only) and picks the
  lowest loss on a validation split (100 training rows never trained on). LoRA is swept once, at r=16, and
  every rank uses that LR: with alpha fixed, s*r is the same at every rank, so one LR is the same step size
  (the design point above). Quick and smoke use fixed values from the usual ranges (LoRA 2e-3, full 5e-5).
- Data: ``examples/demo/train.jsonl`` rows 0-1399 are the "large" set, rows 0-99 the "small" set, rows
  1400-1499 the validation split for the LR sweep; ``examples/demo/heldout.jsonl`` is only scored.
- Quality (held-out EM, retention, loss, disk size) comes from one training run per cell. Memory and tokens/s
  come from ``--repeats`` (default 2) short timing runs per cell, each its own process: the steady-state
  memory measurement, then ``warmup`` untimed and ``timed`` timed steps on the run's first batches. All runs are
  stored with their spread (max − min); a difference within the larger spread of the two cells is a tie.
- Every run (and every method's sweep) is a subprocess of this script, so memory numbers do not leak
  between runs. Finished runs are written to the JSON file at once; ``--resume`` skips them.
- The JSON records its provenance (``benchmarks/provenance.py``: commit, CPU and flags, threads, versions,
  lorafit's runtime options), and each run the runtime options and lean kernels its model trained with.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from provenance import git_info, provenance

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TRAIN = ROOT / "examples" / "demo" / "train.jsonl"
HELDOUT = ROOT / "examples" / "demo" / "heldout.jsonl"
RETENTION = ROOT / "examples" / "retention" / "retention.jsonl"

LORA_ALPHA = 16
MB = 1024 * 1024

MODES = {
    # methods, sizes, steps, micro-batch, sweep (LRs per kind, steps) or fixed LRs, held-out / retention limits
    "full": dict(methods=["full", "r4", "r8", "r16", "r64", "q8"], sizes=["large", "small"], steps=50, batch=8,
                 sweep={"full": [1e-5, 3e-5, 1e-4], "lora": [2e-4, 6e-4, 2e-3]}, sweep_steps=20,
                 sweep_data="large", heldout_limit=None, retention_limit=None, out="claims", warmup=2, timed=8),
    "quick": dict(methods=["full", "r8", "r64", "q8"], sizes=["large"], steps=40, batch=8, sweep=None, sweep_steps=0,
                  heldout_limit=None, retention_limit=None, out="claims_quick", warmup=2, timed=6),
    "smoke": dict(methods=["full", "r8"], sizes=["small"], steps=3, batch=8,
                  sweep={"lora": [1e-3, 2e-3]}, sweep_steps=2, sweep_data="small",
                  heldout_limit=10, retention_limit=12, out="claims_smoke", warmup=1, timed=2),
}
FIXED_LR = {"full": 5e-5, "lora": 2e-3}
SWEEP_AT = {"full": "full", "lora": "r16"}  # the method whose sweep sets the LR of its kind
SIZES = {"large": 1400, "small": 100}
VAL_ROWS = (1400, 1500)


def kind(method: str) -> str:
    """The LR family: QLoRA ("q8": r=8 over an NF4 base) takes LoRA's learning rate."""
    return "full" if method == "full" else "lora"


def rank(method: str) -> int | None:
    return None if method == "full" else int(method[1:])


def is_qlora(method: str) -> bool:
    return method.startswith("q")


def label(method: str) -> str:
    return "full FT" if method == "full" else f"{'QLoRA' if is_qlora(method) else 'LoRA'} r={rank(method)}"


# ------------------------------------------------------------------------------------------- worker side

def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def make_cfg(method: str, data: Path, eval_data: Path, steps: int, batch: int, lr: float, out: Path):
    from lorafit.config import TrainConfig

    d = dict(base_model="demo", adapter=("qlora" if is_qlora(method) else "lora") if kind(method) == "lora" else None,
             load_in_4bit=is_qlora(method),
             lora_r=rank(method) or 8, lora_alpha=LORA_ALPHA, lora_dropout=0.0, lora_target_linear=True,
             datasets=[{"path": str(data), "type": "chat_template"}],
             test_datasets=[{"path": str(eval_data), "type": "chat_template"}],
             sequence_len=128, micro_batch_size=batch, gradient_accumulation_steps=1, max_steps=steps,
             learning_rate=lr, lr_scheduler="cosine", warmup_steps=max(1, steps // 10), weight_decay=0.0,
             max_grad_norm=1.0, bf16=False, gradient_checkpointing=False, output_dir=str(out), seed=42)
    return TrainConfig.from_dict(d, source=f"claims:{method}")


MEMORY_STEPS = 3  # steps measured for the peak, as ``lorafit measure`` does (the optimizer's state is live from step 2)


def measure_step(cfg, steps: int = MEMORY_STEPS) -> dict:
    """Steady-state peak tensor memory of real training steps (MemTracker, by kind) and the process RSS.

    The same measurement as ``lorafit measure`` (:func:`lorafit.measure.measure`): ``steps`` steps of the
    trainer's own code (model from ``prepare_model``, the config's optimizer and scheduler, ``train_step``),
    each under a fresh tracker that also counts the parameters and the optimizer states earlier steps made; the
    peak is the largest step's. The first step runs before AdamW has allocated its states, so its peak alone
    would leave them out. Every step trains on the widest of the first 20 batches.
    """
    from lorafit._compat import mem_tracker, skip_frozen_grad_hooks
    from lorafit.data import batches, build_datasets
    from lorafit.lora import count_parameters
    from lorafit.train import prepare_model, seed_everything, train_step
    from lorafit.train.optim import optimizer_from_config, scheduler_from_config

    seed_everything(cfg.seed)
    options = cfg.runtime_options()
    model, tok = prepare_model(cfg, options)
    samples, _, _ = build_datasets(cfg, tok)
    batch = max(batches(samples, micro_batch_size=cfg.micro_batch_size, sequence_len=cfg.sequence_len,
                        pad_id=tok.pad_token_id, packing=False, shuffle=True, seed=cfg.seed, epoch=0)[:20],
                key=lambda b: b["input_ids"].numel())  # the widest of the first batches
    params = count_parameters(model)
    optimizer = optimizer_from_config(model, cfg)
    scheduler = scheduler_from_config(optimizer, cfg, max(steps, 10))
    model.train()
    rss_before = rss_now()
    per_step = []
    for _ in range(steps):
        mt = mem_tracker()
        skip_frozen_grad_hooks(mt, model)  # frozen parameters (a LoRA base) cannot take a gradient hook
        mt.track_external(model, optimizer)  # parameters and the optimizer states made by earlier steps
        with mt:
            train_step(model, optimizer, scheduler, [batch], cfg.max_grad_norm, cfg.loss_chunk_tokens, options)
        snap = mt.get_tracker_snapshot("peak")
        dev = next(iter(snap.values())) if snap else {}
        per_step.append({str(getattr(k, "value", k)): int(v) for k, v in dev.items()})
        del mt
        gc.collect()
    by_kind = max(per_step, key=lambda d: d.get("Total", 0))
    out = {"peak_bytes": by_kind.get("Total", 0), "peak_by_kind": by_kind,
           "peak_step": per_step.index(by_kind) + 1, "mem_steps": steps,
           "peak_bytes_by_step": [d.get("Total", 0) for d in per_step],
           "rss_peak_bytes": rss_peak(), "rss_before_step_bytes": rss_before,
           "mem_batch_shape": list(batch["input_ids"].shape),
           "trainable_params": params.trainable, "total_params": params.total,
           "runtime_options": options.to_dict(), "lean_kernels": dict(model.lean_kernels.applied)}
    del model, optimizer, scheduler
    gc.collect()
    return out


def time_steps(cfg, warmup: int, timed: int) -> dict:
    """Steady-state training speed: ``warmup`` untimed steps (compiling, AdamW's first states), then ``timed``
    steps of the trainer's own ``train_step`` timed one by one, on the first ``warmup + timed`` batches of the
    run's own schedule (the same batches in every repeat). tokens/s = tokens of the timed steps / their time."""
    from lorafit.data import batches, build_datasets
    from lorafit.train import prepare_model, seed_everything, train_step
    from lorafit.train.optim import optimizer_from_config, scheduler_from_config

    seed_everything(cfg.seed)
    options = cfg.runtime_options()
    model, tok = prepare_model(cfg, options)
    samples, _, _ = build_datasets(cfg, tok)
    order = batches(samples, micro_batch_size=cfg.micro_batch_size, sequence_len=cfg.sequence_len,
                    pad_id=tok.pad_token_id, packing=False, shuffle=True, seed=cfg.seed, epoch=0)
    order = (order * (1 + (warmup + timed) // max(len(order), 1)))[:warmup + timed]
    optimizer = optimizer_from_config(model, cfg)
    scheduler = scheduler_from_config(optimizer, cfg, cfg.max_steps)
    model.train()
    step_s, tokens = [], 0
    for i, batch in enumerate(order):
        t = time.perf_counter()
        row = train_step(model, optimizer, scheduler, [batch], cfg.max_grad_norm, cfg.loss_chunk_tokens, options)
        dt = time.perf_counter() - t
        if i >= warmup:
            step_s.append(dt)
            tokens += row["tokens"]
    out = {"tokens_per_s": tokens / max(sum(step_s), 1e-9), "step_s": step_s, "tokens": tokens,
           "warmup_steps": warmup, "timed_steps": timed, "loadavg_1m": os.getloadavg()[0]}
    del model, optimizer, scheduler
    gc.collect()
    return out


def disk_size(out: Path, method: str) -> int:
    folder = out if kind(method) == "lora" else out / "model"
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def score_model(model, tok, heldout: Path, retention: Path, limit: int | None) -> dict:
    from lorafit.eval.report import evaluate_model

    t = time.perf_counter()
    r = evaluate_model(model, tok, None, str(heldout), str(retention), limit)
    return {"heldout_em": r["heldout_exact_match"], "retention_acc": r["retention_accuracy"],
            "retention_ppl": r["retention_ppl"], "examples": r.get("_examples", []),
            "score_s": time.perf_counter() - t}


def worker(spec: dict) -> dict:
    import torch
    from rich.console import Console

    torch.set_num_threads(spec["threads"])
    quiet = Console(file=io.StringIO())
    work = Path(spec["work"])
    if spec["job"] == "base":
        from lorafit.models import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer("demo")
        return score_model(model, tok, Path(spec["heldout"]), Path(spec["retention"]), spec["heldout_limit"])

    from lorafit.train import train

    method = spec["method"]
    if spec["job"] == "timing":  # one repeat of a cell's timed part: steady-state memory, then speed
        cfg = make_cfg(method, Path(spec["data"]), Path(spec["heldout"]), spec["steps"], spec["batch"], spec["lr"],
                       work / "timing" / spec["run_id"])
        res = measure_step(cfg)
        res.update(time_steps(cfg, spec["warmup"], spec["timed"]))
        return res
    if spec["job"] == "sweep":  # short runs on the large set, lowest validation loss wins
        losses = {}
        for lr in spec["lrs"]:
            out = work / "sweep" / f"{method}-lr{lr:g}"
            cfg = make_cfg(method, Path(spec["data"]), Path(spec["val"]), spec["steps"], spec["batch"], lr, out)
            r = train(cfg, console=quiet)
            losses[f"{lr:g}"] = r.eval_loss if r.eval_loss is not None and math.isfinite(r.eval_loss) else None
            del r
            shutil.rmtree(out, ignore_errors=True)
            gc.collect()
            print(f"  sweep {label(method)} lr={lr:g}: val loss {losses[f'{lr:g}']}", flush=True)
        return {"val_loss": losses}

    out = work / "runs" / spec["run_id"]
    shutil.rmtree(out, ignore_errors=True)
    cfg = make_cfg(method, Path(spec["data"]), Path(spec["heldout"]), spec["steps"], spec["batch"], spec["lr"], out)
    res = {"run_id": spec["run_id"], "commit": git_info()["commit"], "method": method, "label": label(method),
           "rank": rank(method),
           "alpha": LORA_ALPHA if kind(method) == "lora" else None, "size": spec["size"],
           "train_rows": spec["rows"], "lr": spec["lr"], "steps": spec["steps"], "micro_batch": spec["batch"]}
    # Memory and speed are measured in the cell's timing repeats (``job: timing``), not here: one training run
    # per cell gives the quality columns; its own tokens/s (whole run: compiling and evaluation setup included)
    # is kept as ``tokens_per_s_train``, for information only.
    r = train(cfg, console=quiet)
    res.update({"train_loss": r.train_loss, "heldout_loss": r.eval_loss, "train_wall_s": r.wall_s,
                "tokens_per_s_train": r.tokens_per_s, "disk_bytes": disk_size(out, method)})
    from lorafit.models import load_model_and_tokenizer

    _, tok = load_model_and_tokenizer("demo")
    res.update(score_model(r.model, tok, Path(spec["heldout"]), Path(spec["retention"]), spec["heldout_limit"]))
    if kind(method) == "full" and not spec.get("keep_models"):
        shutil.rmtree(out / "model", ignore_errors=True)  # 0.5 GB per run; its size is recorded above
    return res


# ------------------------------------------------------------------------------------------------ report

ORDER = ["full", "r4", "r8", "r16", "r64", "q8"]
LORA = ["r4", "r8", "r16", "r64"]  # plain LoRA: the claims compare these with full FT; QLoRA is reported apart


def _ordered(runs: dict) -> list[dict]:
    key = {m: i for i, m in enumerate(ORDER)}
    return sorted(runs.values(), key=lambda r: (r["size"] != "large", key.get(r["method"], 99)))


def timing_summary(runs: list[dict]) -> dict:
    """A cell's speed and memory over its timing repeats: the mean tokens/s, every run's, their spread (max − min,
    also relative to the mean), and the peak memory of each (MemTracker counts bytes: the spread is usually 0)."""
    tps = [t["tokens_per_s"] for t in runs]
    peaks = [t["peak_bytes"] for t in runs]
    mean = sum(tps) / len(tps)
    worst = max(runs, key=lambda t: t["peak_bytes"])
    return {"tokens_per_s": mean, "tokens_per_s_runs": tps, "tokens_per_s_spread": max(tps) - min(tps),
            "tokens_per_s_spread_rel": (max(tps) - min(tps)) / mean, "repeats": len(runs),
            "peak_bytes": worst["peak_bytes"], "peak_by_kind": worst["peak_by_kind"],
            "peak_bytes_runs": peaks, "peak_bytes_spread": max(peaks) - min(peaks),
            "rss_peak_bytes": max(t["rss_peak_bytes"] for t in runs),
            "rss_peak_bytes_runs": [t["rss_peak_bytes"] for t in runs],
            "trainable_params": worst["trainable_params"], "total_params": worst["total_params"]}


def speed(r: dict) -> tuple[float, list[float], float | None]:
    """(mean tokens/s, every timed run's, their spread max − min or None when one run measured it). Handles the
    older JSON shape, where one whole training run per cell (compile step included) gave the figure."""
    runs = r.get("tokens_per_s_runs") or [r["tokens_per_s"]]
    return r["tokens_per_s"], runs, (max(runs) - min(runs)) if len(runs) > 1 else None


def compare(a: float, b: float, spread_a: float | None, spread_b: float | None) -> str:
    """'tie' when |a − b| is within the larger run-to-run spread of the two cells, 'unknown' when a spread is
    unmeasured (one run), else 'higher' / 'lower' (a against b)."""
    if spread_a is None or spread_b is None:
        return "unknown"
    if abs(a - b) <= max(spread_a, spread_b):
        return "tie"
    return "higher" if a > b else "lower"


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def em_tolerance(n: int) -> float:
    """Exact-match differences below this are treated as noise: about 1.4 binomial standard errors at p=0.5."""
    return max(0.03, 1.0 / math.sqrt(max(n, 1)))


def forgetting(r: dict, base: dict) -> tuple[float, float]:
    """(retention accuracy drop in points of 1, relative perplexity increase) against the base model."""
    return base["retention_acc"] - r["retention_acc"], r["retention_ppl"] / base["retention_ppl"] - 1


def findings(results: dict) -> list[str]:
    """Statements derived from the numbers with fixed thresholds; nothing here is written in advance."""
    base, runs, meta = results["base"], results["runs"], results["meta"]
    by = {(r["method"], r["size"]): r for r in runs.values()}
    sizes = [s for s in ("large", "small") if any(r["size"] == s for r in runs.values())]
    tol = em_tolerance(meta["heldout_rows"])
    out = [f"Base model: held-out exact match {_pct(base['heldout_em'])}, retention accuracy "
           f"{_pct(base['retention_acc'])}, perplexity of its own answers {base['retention_ppl']:.3f}. "
           f"Exact-match differences under {100 * tol:.0f} points are within noise for "
           f"{meta['heldout_rows']} held-out rows."]
    if not runs:
        return out + ["No finished runs."]

    # (1) memory
    size = "large" if "large" in sizes else sizes[0]
    full = by.get(("full", size))
    loras = [by[(m, size)] for m in LORA if (m, size) in by]
    if full and loras:
        ratios = [r["peak_bytes"] / full["peak_bytes"] for r in loras]
        k = lambda r, name: r["peak_by_kind"].get(name, 0) / MB  # noqa: E731
        worst = max(ratios)
        verdict = ("holds" if worst <= 0.8 else "holds only weakly" if worst <= 0.95 else "does NOT hold")
        if meta.get("memory_steps"):
            how = (f"Steady-state peak tensor memory (largest of {meta['memory_steps']} training steps, optimizer "
                   f"state live; {_runs_note(full)})")
        else:  # the older JSON: the first step's peak, before AdamW allocates its states
            how = ("First-step peak tensor memory (before AdamW's states exist: the LoRA rows carry no optimizer "
                   "state, so their share is understated)")
        out.append(
            f"**Memory ({verdict}).** {how}: full FT {full['peak_bytes'] / MB:.0f} MiB, "
            f"LoRA {min(r['peak_bytes'] for r in loras) / MB:.0f}-{max(r['peak_bytes'] for r in loras) / MB:.0f} MiB "
            f"({_pct(min(ratios))}-{_pct(worst)} of full). Weights are the same {k(full, 'Parameter'):.0f} MiB in both "
            f"(LoRA keeps the frozen base). At full FT's peak, gradients + optimizer states hold "
            f"{k(full, 'Gradient') + k(full, 'Optstate'):.0f} MiB and activations {k(full, 'Activation'):.0f} MiB; "
            f"LoRA's gradients + Adam states are only {max(r['trainable_params'] for r in loras) * 12 / MB:.0f} MiB "
            f"at most (fp32), so its peak is set by activations "
            f"({min(k(r, 'Activation') for r in loras):.0f}-{max(k(r, 'Activation') for r in loras):.0f} MiB at "
            f"its peak): the saving shrinks as batch x sequence grows. Process peak RSS: full {full['rss_peak_bytes'] / MB:.0f} MiB, "
            f"LoRA {min(r['rss_peak_bytes'] for r in loras) / MB:.0f}-{max(r['rss_peak_bytes'] for r in loras) / MB:.0f} MiB.")
        f_tps, f_runs, f_spread = speed(full)
        cells = []
        for r in loras:
            tps, runs, spread = speed(r)
            cells.append((r, tps / f_tps, compare(tps, f_tps, spread, f_spread), spread))
        verdicts = {c for _, _, c, _ in cells}
        if "unknown" in verdicts:
            word = ("not established: one timed run per cell (the whole training run, compiling included), so "
                    "the run-to-run spread is unmeasured and no difference is claimed")
        elif verdicts == {"tie"}:
            word = "a tie: every difference is within the run-to-run spread"
        elif verdicts == {"higher"}:
            word = "faster"
        elif verdicts == {"lower"}:
            word = "slower"
        else:
            word = "faster at some ranks, tied or slower at others"
        each = "; ".join(f"{r['label']} {speed(r)[0]:.0f} tok/s, {x:.2f}x"
                         + (f" ({c})" if c != "unknown" else "") for r, x, c, _ in cells)
        spreads = "" if "unknown" in verdicts else (
            f"; run-to-run spread (max - min of {len(f_runs)} runs): full FT {f_spread:.0f} tok/s "
            f"({100 * f_spread / f_tps:.0f}%), " + ", ".join(f"{r['label']} {s_:.0f}" for r, *_, s_ in cells)
            + " tok/s")
        out.append(f"**Speed and disk.** LoRA's speed against full FT's ({f_tps:.0f} tok/s) is {word}: {each}"
                   f"{spreads}. Adapters take {min(r['disk_bytes'] for r in loras) / MB:.1f}-{max(r['disk_bytes'] for r in loras) / MB:.1f} MiB "
                   f"on disk vs {full['disk_bytes'] / MB:.0f} MiB for the full fine-tuned model.")

    # (2) forgetting
    for size in sizes:
        full = by.get(("full", size))
        loras = [by[(m, size)] for m in LORA if (m, size) in by]
        if not (full and loras):
            continue
        f_acc, f_ppl = forgetting(full, base)
        noticeable = lambda acc, ppl: acc >= 0.05 or ppl >= 0.05  # noqa: E731
        lo = [(r, *forgetting(r, base)) for r in loras]
        desc = (f"full FT: accuracy {_pct(full['retention_acc'])}, perplexity +{100 * f_ppl:.1f}%; "
                + "; ".join(f"{r['label']}: {_pct(r['retention_acc'])}, +{100 * p:.1f}%" for r, _, p in lo))
        if not noticeable(f_acc, f_ppl) and not any(noticeable(a, p) for _, a, p in lo):
            verdict = "not tested: no method forgot measurably (accuracy drop < 5 points, perplexity rise < 5%)"
        elif all(p < f_ppl and a <= f_acc + 0.03 for _, a, p in lo):
            verdict = "holds"
        elif all(p >= f_ppl and a >= f_acc - 0.03 for _, a, p in lo):
            verdict = "does NOT hold: every LoRA run forgot as much or more than full FT"
        else:
            worse = [r["label"] for r, a, p in lo if p >= f_ppl]
            verdict = ("holds only partly: " + ", ".join(worse) + " forgot as much or more than full FT") if worse \
                else "holds on perplexity, not on accuracy"
        learned = max(r["heldout_em"] for r in loras) - full["heldout_em"]
        caveat = ""
        if learned >= tol:
            caveat = (f" Caveat: full FT also learned less here (held-out {_pct(full['heldout_em'])} vs best LoRA "
                      f"{_pct(max(r['heldout_em'] for r in loras))}), so this is not like-for-like.")
        elif -learned >= tol:
            caveat = (f" Caveat: full FT learned more (held-out {_pct(full['heldout_em'])} vs best LoRA "
                      f"{_pct(max(r['heldout_em'] for r in loras))}): less forgetting may just be less learning.")
        out.append(f"**Forgets less, {SIZES[size]} rows ({verdict}).** {desc}.{caveat}")

    # (3) little data
    if "small" in sizes:
        small = [by[(m, "small")] for m in LORA if (m, "small") in by]
        full_s = by.get(("full", "small"))
        if small:
            best = max(small, key=lambda r: r["heldout_em"])
            large = by.get((best["method"], "large"))
            works = best["heldout_em"] >= 0.8 or (large is not None and best["heldout_em"] >= large["heldout_em"] - tol)
            parts = [f"best LoRA on {SIZES['small']} rows ({best['label']}) reaches {_pct(best['heldout_em'])}"]
            if large:
                parts.append(f"vs {_pct(large['heldout_em'])} on {SIZES['large']} rows")
            verdict = "holds" if works else "does NOT hold"
            if full_s:
                parts.append(f"full FT on {SIZES['small']} rows: {_pct(full_s['heldout_em'])}")
                if full_s["heldout_em"] >= best["heldout_em"] - tol and works:
                    verdict = "holds, but is not special to LoRA: full FT does as well on little data"
                elif full_s["heldout_em"] >= best["heldout_em"] + tol:
                    verdict += "; full FT does better on little data here"
            out.append(f"**Works with little data ({verdict}).** " + ", ".join(parts) + ".")

    # (4) rank
    for size in sizes:
        ranked = [by[(m, size)] for m in LORA if (m, size) in by]
        if len(ranked) < 2:
            continue
        best = max(r["heldout_em"] for r in ranked)
        enough = min((r for r in ranked if r["heldout_em"] >= best - tol), key=lambda r: r["rank"])
        desc = ", ".join(f"r={r['rank']} {_pct(r['heldout_em'])}" for r in ranked)
        smallest = ranked[0]
        if enough is smallest:
            verdict = f"holds for this easy task: r={smallest['rank']} is within noise of the best rank"
        else:
            verdict = (f"does NOT hold here: r={smallest['rank']} trails; r={enough['rank']} is the smallest rank "
                       f"within noise of the best")
        ppl = ", ".join(f"r={r['rank']} +{100 * forgetting(r, base)[1]:.1f}%" for r in ranked)
        out.append(f"**Small rank for an easy task, {SIZES[size]} rows ({verdict}).** Held-out: {desc}. "
                   f"Retention perplexity rise: {ppl}.")
    out += qlora_findings(by, base, sizes, tol)
    out.append("The second half of claim 4 (harder tasks want r = 16-64) is not tested: there is one task here, "
               "and it is easy for this model. Learning rates, alpha and the token budget are in the table notes.")
    return out


def qlora_findings(by: dict, base: dict, sizes: list[str], tol: float) -> list[str]:
    """QLoRA against LoRA of the same rank: memory (weights, peak), speed, and what it learned and kept."""
    out = []
    for size in sizes:
        for q in [r for (m, s), r in by.items() if s == size and is_qlora(m)]:
            lora = by.get((f"r{q['rank']}", size))
            if lora is None:
                continue
            k = lambda r: r["peak_by_kind"].get("Parameter", 0) / MB  # noqa: E731
            tps, _, spread = speed(q)
            l_tps, _, l_spread = speed(lora)
            em = q["heldout_em"] - lora["heldout_em"]
            out.append(
                f"**QLoRA, {SIZES[size]} rows.** {q['label']} over an NF4 base against {lora['label']}: weights "
                f"{k(q):.0f} vs {k(lora):.0f} MiB, peak {q['peak_bytes'] / MB:.0f} vs {lora['peak_bytes'] / MB:.0f} MiB "
                f"({_pct(q['peak_bytes'] / lora['peak_bytes'])}), {tps:.0f} vs {l_tps:.0f} tok/s "
                f"({speed_note(q, lora, tps, l_tps, spread, l_spread)}); held-out {_pct(q['heldout_em'])} vs "
                f"{_pct(lora['heldout_em'])} ({'within noise' if abs(em) < tol else 'a real difference'}), retention "
                f"{_pct(q['retention_acc'])} vs {_pct(lora['retention_acc'])}, perplexity "
                f"+{100 * forgetting(q, base)[1]:.1f}% vs +{100 * forgetting(lora, base)[1]:.1f}%.")
    return out


def speed_note(a: dict, b: dict, tps: float, b_tps: float, spread, b_spread) -> str:
    """How two cells' speeds compare, unless they were timed at different commits (a resumed file)."""
    commits = {r.get("commit") for r in (a, b)}
    if len(commits) > 1 or None in commits:
        return "timed in separate invocations, possibly at different commits: not compared"
    return compare(tps, b_tps, spread, b_spread)


def _runs_note(r: dict) -> str:
    n = r.get("repeats") or 1
    spread = r.get("peak_bytes_spread")
    return f"{n} run(s) per cell" + (f", spread of the peak {spread / MB:.1f} MiB" if spread is not None else "")


def _tps_cell(r: dict) -> str:
    tps, runs, spread = speed(r)
    if spread is None:
        return f"{tps:.0f} (1 run)"
    return f"{tps:.0f} ({min(runs):.0f}-{max(runs):.0f}, {len(runs)} runs)"


def _row(r: dict, base: dict) -> list[str]:
    k = r["peak_by_kind"]
    acc_drop, ppl_rise = forgetting(r, base)
    return [r["label"], str(r["train_rows"]), f"{r['lr']:g}", f"{r['trainable_params'] / 1e6:.2f}M",
            f"{r['peak_bytes'] / MB:.0f}",
            f"{k.get('Parameter', 0) / MB:.0f}/{k.get('Gradient', 0) / MB:.0f}/{k.get('Optstate', 0) / MB:.0f}/"
            f"{k.get('Activation', 0) / MB:.0f}",
            f"{r['rss_peak_bytes'] / MB:.0f}", _tps_cell(r), f"{r['disk_bytes'] / MB:.1f}",
            _pct(r["heldout_em"]), _pct(r["retention_acc"]),
            f"{r['retention_ppl']:.3f} (+{100 * ppl_rise:.1f}%)"]


HEADER = ["method", "train rows", "LR", "trainable", "peak MiB", "at peak: params/grads/optim/acts MiB", "peak RSS MiB",
          "tokens/s (range, runs)", "disk MiB", "held-out EM", "retention acc", "retention ppl"]


def measurement_note(meta: dict) -> str:
    """How memory and tokens/s were measured, from what the JSON records (older JSONs: first-step memory, one
    whole training run per cell for tokens/s)."""
    if meta.get("memory_steps"):
        mem = (f"Peak memory is MemTracker's steady-state peak: the largest of {meta['memory_steps']} training steps, "
               "each tracked with the parameters and the optimizer states of the steps before (tensors only, split "
               "by kind; the measurement of `lorafit measure`); RSS is the whole process (Python, torch, tokenizer "
               "included).")
    else:
        mem = ("Peak memory is MemTracker's peak of the first training step, before AdamW's states exist (LoRA rows "
               "carry no optimizer state); RSS is the whole process.")
    t = meta.get("timing")
    if t:
        tps = (f" tokens/s: {t['repeats']} separate timed runs per cell (each its own process: {t['warmup']} untimed "
               f"steps, then {t['timed']} timed steps on the same batches), their mean and range; a difference "
               "within the larger range of the two cells compared is called a tie.")
    else:
        tps = (" tokens/s: one run per cell, the whole training run's tokens over its wall time (compiling "
               "included); the run-to-run spread was not measured.")
    return mem + tps


def write_report(results: dict, stem: Path) -> None:
    base, meta = results["base"], results["meta"]
    runs = _ordered(results["runs"])
    lines = [f"# The article's claims, measured ({meta['mode']} mode)", "",
             f"{meta['model']}, {meta['task']}; every run: {meta['steps']} steps x {meta['micro_batch']} samples "
             f"(same token budget), sequence_len {meta['sequence_len']}, cosine schedule, AdamW, fp32, "
             f"{meta['threads']} CPU thread(s). LoRA: all linear layers, alpha = {meta['lora_alpha']} at every rank "
             f"(so s*r is the same and one LR means the same first-step size at every rank). "
             f"Learning rates: {meta['lr_policy']}. Held-out: {meta['heldout_rows']} rows; retention: "
             f"{meta['retention_rows']} prompts the base model answers right.", "",
             measurement_note(meta) + " Produced by `python benchmarks/claims.py"
             + {"full": "", "quick": " --quick", "smoke": " --smoke"}[meta["mode"]] + "`.", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER),
             f"| base model | - | - | - | - | - | - | - | - | {_pct(base['heldout_em'])} | {_pct(base['retention_acc'])} "
             f"| {base['retention_ppl']:.3f} |"]
    lines += ["| " + " | ".join(_row(r, base)) + " |" for r in runs]
    if results.get("lr"):
        lines += ["", "Learning rates (validation loss after the sweep, when swept):", ""]
        for m, v in results["lr"].items():
            sweep = ", ".join(f"{lr}: {loss:.4f}" if loss is not None else f"{lr}: diverged"
                              for lr, loss in (v.get("val_loss") or {}).items())
            lines.append(f"- {label(m)}: {v['lr']:g}" + (f" (sweep {sweep})" if sweep else "")
                         + (f" — {v['note']}" if v.get("note") and v["note"] != "fixed" else ""))
    lines += ["", "## What we found", ""] + [f"- {s}" for s in findings(results)]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot(results, stem.with_suffix(".png"))
    print_table(results)


COLORS = {"full": "tab:red", "r4": "tab:blue", "r8": "tab:cyan", "r16": "tab:green", "r64": "tab:purple", "q8": "tab:orange"}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base, runs = results["base"], _ordered(results["runs"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    for r in runs:
        marker = "o" if r["size"] == "large" else "^"
        c = COLORS.get(r["method"], "k")
        name = f"{r['label']}, {r['train_rows']} rows"
        # a legend, not labels on the points: runs that tie would print on top of each other
        ax1.scatter(r["heldout_em"] * 100, r["retention_ppl"], marker=marker, color=c, s=60, alpha=0.8, label=name)
        ax2.scatter(r["peak_bytes"] / MB, r["heldout_em"] * 100, marker=marker, color=c, s=60, alpha=0.8)
    ax1.axhline(base["retention_ppl"], color="gray", ls="--", lw=1)
    ax1.scatter([base["heldout_em"] * 100], [base["retention_ppl"]], marker="*", color="k", s=120,
                label=f"base model (retention acc {_pct(base['retention_acc'])})")
    ax1.set_xlabel("held-out exact match (%)  → learned more")
    ax1.set_ylabel("retention: perplexity of base model's answers  ↓ forgot less")
    ax1.set_title("task score vs retention (o = large set, ^ = small set)")
    ax2.set_xlabel(("steady-state" if results["meta"].get("memory_steps") else "first-step (no optimizer state)")
                   + " peak tensor memory of training (MiB, MemTracker)")
    ax2.set_ylabel("held-out exact match (%)")
    ax2.set_title("memory vs task score")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7, loc="best")
    meta = results["meta"]
    fig.suptitle(f"SmolLM2-135M-Instruct, demo task: full FT vs LoRA ({meta['mode']} mode, {meta['steps']} steps x "
                 f"{meta['micro_batch']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    base = results["base"]
    t = Table(title=f"claims benchmark ({results['meta']['mode']})")
    for h in HEADER:
        t.add_column(h, justify="left" if h == "method" else "right")
    t.add_row("base model", *(["-"] * 8), _pct(base["heldout_em"]), _pct(base["retention_acc"]),
              f"{base['retention_ppl']:.3f}")
    for r in _ordered(results["runs"]):
        t.add_row(*_row(r, base))
    console = Console()
    console.print(t)
    for s in findings(results):
        console.print("• " + s.replace("**", ""), highlight=False, markup=False)


# ------------------------------------------------------------------------------------------- parent side

def prepare_data(work: Path, retention_limit: int | None, val_limit: int | None) -> dict[str, Path]:
    rows = TRAIN.read_text(encoding="utf-8").splitlines()
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, n in SIZES.items():
        files[name] = data / f"train_{name}.jsonl"
        files[name].write_text("\n".join(rows[:n]) + "\n", encoding="utf-8")
    files["val"] = data / "val.jsonl"
    val = rows[VAL_ROWS[0]:VAL_ROWS[1]][:val_limit]
    files["val"].write_text("\n".join(val) + "\n", encoding="utf-8")
    files["retention"] = RETENTION
    if retention_limit:
        files["retention"] = data / "retention.jsonl"
        lines = RETENTION.read_text(encoding="utf-8").splitlines()[:retention_limit]
        files["retention"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return files


def run_worker(spec: dict, log: Path) -> dict:
    spec_path = log.with_suffix(".spec.json")
    res_path = log.with_suffix(".result.json")
    spec_path.write_text(json.dumps(spec))
    res_path.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, __file__, "--worker", str(spec_path), str(res_path)],
                              stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode != 0 or not res_path.is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"worker {log.stem} failed (exit {proc.returncode}); log {log}:\n{tail}")
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("  sweep"):
            print(line)
    return json.loads(res_path.read_text())


def save(results: dict, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)


def choose_lr(val_loss: dict) -> tuple[float, str]:
    ok = {float(k): v for k, v in val_loss.items() if v is not None}
    if not ok:
        return min(float(k) for k in val_loss), "every LR diverged; the smallest was used"
    best = min(ok, key=ok.get)
    grid = sorted(float(k) for k in val_loss)
    note = ""
    if best in (grid[0], grid[-1]) and len(grid) > 1:
        note = f"at the {'low' if best == grid[0] else 'high'} edge of the grid"
    return best, note


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="full FT vs r=8 vs r=64 on one size, fixed LRs (< 10 min)")
    g.add_argument("--smoke", action="store_true", help="a few steps, to check the script runs (~2 min)")
    ap.add_argument("--resume", action="store_true", help="keep finished runs in the JSON file and skip them")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per run")
    ap.add_argument("--steps", type=int, help="override the steps per run (same for every run)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="timed repeats per cell (each a separate short process: steady-state memory, then timed "
                         "steps); at least 2 to measure the run-to-run spread (default 2)")
    ap.add_argument("--timed-steps", type=int, help="override the timed steps per repeat")
    ap.add_argument("--methods", help="comma-separated subset, e.g. full,r8,r64")
    ap.add_argument("--sizes", help="comma-separated subset of large,small")
    ap.add_argument("--no-sweep", action="store_true", help="use the fixed LRs even in full mode")
    ap.add_argument("--lr", help="fixed LRs for --no-sweep, e.g. full=3e-5,lora=2e-3 (an earlier sweep's picks)")
    ap.add_argument("--keep-models", action="store_true", help="keep full fine-tuned model folders (0.5 GB each)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "claims"), help="folder for data copies, runs, logs")
    ap.add_argument("--results-dir", type=Path, default=RESULTS, help="where the JSON, markdown and plot go")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the markdown and plot from the mode's JSON in --results-dir; run nothing")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        result = worker(json.loads(Path(args.worker[0]).read_text()))
        Path(args.worker[1]).write_text(json.dumps(result))
        return 0

    mode_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    mode = dict(MODES[mode_name])
    if args.steps:
        mode["steps"] = args.steps
    if args.methods:
        mode["methods"] = args.methods.split(",")
    if args.sizes:
        mode["sizes"] = args.sizes.split(",")
    if args.no_sweep:
        mode["sweep"] = None
    for pair in (args.lr or "").split(","):
        if pair:
            kind_, value = pair.split("=")
            FIXED_LR[kind_] = float(value)
    if args.timed_steps:
        mode["timed"] = args.timed_steps
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.report_only:
        stem = args.results_dir / mode["out"]
        write_report(json.loads(stem.with_suffix(".json").read_text()), stem)
        print(f"wrote {stem}.md and {stem}.png from {stem}.json")
        return 0
    work = Path(args.work) / mode_name
    (work / "logs").mkdir(parents=True, exist_ok=True)
    results_dir = args.results_dir
    out_json = results_dir / f"{mode['out']}.json"
    results_dir.mkdir(parents=True, exist_ok=True)
    files = prepare_data(work, mode["retention_limit"], mode["heldout_limit"])

    meta = {"mode": mode_name, "model": "SmolLM2-135M-Instruct (demo, fp32)", "task": "demo date normalisation",
            "steps": mode["steps"], "micro_batch": mode["batch"], "sequence_len": 128, "lora_alpha": LORA_ALPHA,
            "lora_targets": "all-linear", "sizes": {s: SIZES[s] for s in mode["sizes"]},
            "heldout_rows": mode["heldout_limit"] or sum(1 for line in open(HELDOUT) if line.strip()),
            "retention_rows": sum(1 for line in open(files["retention"]) if line.strip()),
            "lr_policy": (f"sweep {mode['sweep']} for {mode['sweep_steps']} steps, lowest validation loss"
                          if mode["sweep"] else f"fixed {FIXED_LR}"),
            "threads": args.threads, "memory_steps": MEMORY_STEPS,
            "memory": "steady-state MemTracker peak: largest of memory_steps steps, optimizer state live",
            "timing": {"repeats": args.repeats, "warmup": mode["warmup"], "timed": mode["timed"],
                       "how": "each repeat a separate process: memory_steps tracked steps, then warmup untimed "
                              "and timed timed steps on the run's first batches; tokens/s = timed tokens / time"}}
    # The runs' processes resolve their runtime options from this environment (the configs set none).
    results = {"meta": meta, "provenance": provenance(threads=args.threads), "base": None, "lr": {}, "runs": {}}
    if args.resume and out_json.is_file():
        old = json.loads(out_json.read_text())
        keys = ("mode", "steps", "micro_batch", "memory_steps")  # no mixing with first-step (older) memory
        if old.get("meta", {}).get("timing", {}).get("timed") not in (None, meta["timing"]["timed"]):
            print(f"{out_json} was timed over other steps ({old['meta']['timing']}); not resuming.")
            return 2
        same = {k: old.get("meta", {}).get(k) for k in keys} == {k: meta[k] for k in keys}
        if not same:
            print(f"{out_json} was made with other settings ({old.get('meta')}); not resuming. "
                  "Remove it or drop --resume.")
            return 2
        results.update({k: old.get(k, results[k]) for k in ("base", "lr", "runs")})
        if old.get("provenance"):  # the kept runs were measured under these
            results["provenance_earlier"] = [*old.get("provenance_earlier", []), old["provenance"]]
        print(f"resuming: {len(results['runs'])} finished run(s) kept")
    t_all = time.perf_counter()
    common = {"threads": args.threads, "work": str(work), "heldout": str(HELDOUT),
              "retention": str(files["retention"]), "heldout_limit": mode["heldout_limit"],
              "batch": mode["batch"], "keep_models": args.keep_models}

    if results["base"] is None:
        t = time.perf_counter()
        results["base"] = run_worker({**common, "job": "base"}, work / "logs" / "base.log")
        results["base"]["wall_s"] = time.perf_counter() - t
        save(results, out_json)
    b = results["base"]
    print(f"base model: held-out EM {b['heldout_em']:.0%}, retention acc {b['retention_acc']:.0%}, "
          f"ppl {b['retention_ppl']:.3f}")

    for method in mode["methods"]:
        if method in results["lr"]:
            continue
        k = kind(method)
        swept = next((m for m, v in results["lr"].items() if kind(m) == k and v.get("val_loss")), None)
        if mode["sweep"] and k in mode["sweep"] and swept:  # one sweep per kind: reuse it
            results["lr"][method] = {**results["lr"][swept], "val_loss": None, "wall_s": 0,
                                     "note": f"from the {label(swept)} sweep"}
        elif mode["sweep"] and k in mode["sweep"]:
            at = SWEEP_AT[k] if SWEEP_AT[k] in mode["methods"] else method
            t = time.perf_counter()
            r = run_worker({**common, "job": "sweep", "method": at, "lrs": mode["sweep"][k],
                            "steps": mode["sweep_steps"], "data": str(files[mode["sweep_data"]]),
                            "val": str(files["val"])},
                           work / "logs" / f"sweep-{at}.log")
            lr, note = choose_lr(r["val_loss"])
            results["lr"][at] = {"lr": lr, "val_loss": r["val_loss"], "note": note,
                                 "wall_s": time.perf_counter() - t}
            if at != method:
                results["lr"][method] = {**results["lr"][at], "val_loss": None, "wall_s": 0,
                                         "note": f"from the {label(at)} sweep"}
        else:
            results["lr"][method] = {"lr": FIXED_LR[k], "val_loss": None, "wall_s": 0,
                                     "note": "fixed (--lr)" if args.lr else "fixed"}
        save(results, out_json)
        print(f"{label(method)}: learning rate {results['lr'][method]['lr']:g} {results['lr'][method]['note']}")

    for size in mode["sizes"]:
        for method in mode["methods"]:
            run_id = f"{method}-{size}"
            if run_id in results["runs"]:
                print(f"{run_id}: already done, skipped")
                continue
            t = time.perf_counter()
            spec = {**common, "job": "run", "run_id": run_id, "method": method, "size": size,
                    "rows": SIZES[size], "data": str(files[size]), "steps": mode["steps"],
                    "lr": results["lr"][method]["lr"]}
            try:
                r = run_worker(spec, work / "logs" / f"{run_id}.log")
            except RuntimeError as e:
                print(f"[{run_id}] {e}")
                continue
            r["wall_s"] = time.perf_counter() - t
            r["timing_runs"] = []
            results["runs"][run_id] = r
            save(results, out_json)
            print(f"{run_id}: EM {r['heldout_em']:.0%}, retention {r['retention_acc']:.0%} / ppl "
                  f"{r['retention_ppl']:.3f}, {r['wall_s']:.0f} s")

    # The timed part: round after round over every cell, so a slow spell of the machine hits all cells alike.
    for rep in range(args.repeats):
        for run_id, r in list(results["runs"].items()):
            timing = r.setdefault("timing_runs", [])
            if len(timing) > rep:
                continue
            t = time.perf_counter()
            spec = {**common, "job": "timing", "run_id": run_id, "method": r["method"],
                    "data": str(files[r["size"]]), "steps": mode["steps"], "lr": r["lr"],
                    "warmup": mode["warmup"], "timed": mode["timed"]}
            try:
                tr = run_worker(spec, work / "logs" / f"{run_id}-timing{rep + 1}.log")
            except RuntimeError as e:
                print(f"[{run_id} timing {rep + 1}] {e}")
                continue
            tr["wall_s"] = time.perf_counter() - t
            timing.append(tr)
            r.update(timing_summary(timing))
            save(results, out_json)
            print(f"{run_id} timing {rep + 1}/{args.repeats}: peak {tr['peak_bytes'] / MB:.0f} MiB, "
                  f"{tr['tokens_per_s']:.0f} tok/s, {tr['wall_s']:.0f} s")
    untimed = [k for k, r in results["runs"].items() if not r.get("timing_runs")]
    for k in untimed:  # a cell whose every timing repeat failed cannot be reported
        print(f"{k}: no timing run finished; left out of the report")
        del results["runs"][k]
    results["meta"]["wall_s_this_invocation"] = time.perf_counter() - t_all
    save(results, out_json)

    write_report(results, results_dir / mode["out"])
    print(f"wrote {out_json}, {mode['out']}.md, {mode['out']}.png in {results_dir} "
          f"({time.perf_counter() - t_all:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
