"""CLI verbs ``estimate``, ``plan`` and ``measure``."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lorafit.config import DEMO_ALIASES
from lorafit.errors import LorafitError
from lorafit.memory import catalog
from lorafit.memory.estimate import Estimate, GiB, Settings, estimate
from lorafit.memory.settings import settings_from_config
from lorafit.memory.spec import resolve_spec

_SETTING_FLAGS = ("method", "dtype", "micro_batch", "seq_len", "r", "alpha", "dropout", "targets", "optimizer",
                  "gradient_checkpointing", "packing", "loss")


def _add_setting_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=["lora", "qlora", "full"],
                   help="lora (default), qlora (LoRA over a 4-bit NF4 base) or full fine-tuning")
    p.add_argument("--dtype", help="bfloat16 (default), float16 or float32")
    p.add_argument("--micro-batch", type=int, help="sequences per micro-batch (default 1)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 2048)")
    p.add_argument("--r", "--lora-r", dest="r", type=int, help="LoRA rank (default 16)")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default 16)")
    p.add_argument("--dropout", type=float, help="LoRA dropout (default 0.05)")
    p.add_argument("--targets", help="all-linear (default) or module names: q_proj,v_proj")
    p.add_argument("--optimizer", help="adamw (default), adamw_torch_fused, adamw_8bit, adamw_torch_8bit, adamw_torch_4bit, "
                                          "paged_adamw_8bit or sgd")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--loss", choices=["chunked", "hf"], help="chunked (lorafit, default) or hf (full logits, as PEFT runs)")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="N processes (torchrun ranks, one device each): the estimate is one rank's (DDP by default)")
    p.add_argument("--fsdp", action="store_true",
                   help="with --nproc: FSDP2 (weights, adapter, gradients and optimizer states sharded 1/N)")


def register(sub) -> None:
    p = sub.add_parser("estimate", help="memory of a planned fine-tune, by component; does it fit a GPU?")
    p.add_argument("model", nargs="?", help="catalog name, local HF folder, config.json, .gguf file or 'demo'")
    p.add_argument("--config", help="a lorafit/axolotl YAML config (its settings; flags override)")
    _add_setting_flags(p)
    p.add_argument("--gpu", help="GPU name (e.g. rtx-4090, a100-80gb); see --list")
    p.add_argument("--gpu-mem", help="GPU memory, e.g. 24GiB")
    p.add_argument("--cpu", action="store_true", help="target is CPU memory: no CUDA overhead")
    p.add_argument("--explain", action="store_true", help="show the formula behind each line")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.add_argument("--compare", action="store_true",
                   help="full fine-tuning, LoRA and QLoRA side by side (with --fsdp: LoRA and QLoRA)")
    p.add_argument("--list", action="store_true", help="list catalog models and GPUs")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("plan", help="search settings that fit a GPU and write a config")
    p.add_argument("model", help="catalog name, local HF folder, config.json, .gguf file or 'demo'")
    _add_setting_flags(p)
    p.add_argument("--gpu", help="GPU name")
    p.add_argument("--gpu-mem", help="GPU memory, e.g. 24GiB")
    p.add_argument("--effective-batch", type=int, default=8, help="sequences per optimizer step (default 8)")
    p.add_argument("--allow-shorter-seq", action="store_true", help="may shorten sequence_len to fit")
    p.add_argument("--margin", type=float, default=0.10, help="safety margin as a fraction (default 0.10)")
    p.add_argument("-o", "--output", default="lorafit-plan.yaml", help="config file to write")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("measure", help="run real training steps and compare the measured peak with the estimate")
    p.add_argument("config", help="a lorafit YAML config")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--random-weights", action="store_true", help="build the model's shape with random weights")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_measure)


# ---- settings from a config file and flags ------------------------------------------------------------
def _settings(args, base: Settings | None = None, device: str = "cuda") -> Settings:
    """Settings from the flags, over ``base`` (a config's) when given."""
    kw = {name: getattr(args, name) for name in _SETTING_FLAGS if getattr(args, name, None) is not None}
    t = kw.get("targets")
    if isinstance(t, str) and t != "all-linear" and all(p.strip().isidentifier() for p in t.split(",")):
        kw["targets"] = [p.strip() for p in t.split(",")]  # names; anything else stays a regex
    kw["device"] = device
    nproc = getattr(args, "nproc", None)
    if nproc is not None and (not isinstance(nproc, int) or nproc < 1):
        raise LorafitError(f"--nproc: got {nproc}, must be an integer >= 1")
    if getattr(args, "fsdp", False):
        if (nproc or (base.nproc if base else 1)) < 2:
            raise LorafitError("--fsdp: FSDP2 shards across processes; give --nproc N with N >= 2")
        kw["fsdp"] = True
    if nproc is not None:
        kw["nproc"] = nproc
        if nproc == 1:
            kw["fsdp"] = False
    if kw.get("method") in ("lora", "full"):
        kw["four_bit"], kw["eight_bit"] = None, False  # --method lora over a quantized config: a dense base
    return replace(base, **kw) if base is not None else Settings(**kw)


def _gpu(args) -> tuple[str | None, int | None]:
    if getattr(args, "gpu", None) and getattr(args, "gpu_mem", None):
        raise LorafitError("give --gpu or --gpu-mem, not both")
    if getattr(args, "gpu", None):
        return args.gpu, catalog.gpu_memory(args.gpu)
    if getattr(args, "gpu_mem", None):
        b = catalog.parse_size(args.gpu_mem)
        return f"{b / GiB:.1f} GiB GPU", b
    return None, None


# ---- estimate ----------------------------------------------------------------------------------------
def cmd_estimate(args) -> int:
    console = Console()
    if args.list:
        return _print_catalog(console)
    base, model = None, args.model
    device = "cpu" if args.cpu else "cuda"
    if args.config:
        from lorafit.config import load_config

        cfg = load_config(args.config)
        if cfg.fsdp_enabled and not args.nproc:
            raise LorafitError(f"{args.config}: FSDP2 asked for (fsdp keys or a DeepSpeed ZeRO-3 config; it shards "
                               "over several processes); give --nproc N for one rank's estimate")
        base = settings_from_config(cfg, device, nproc=args.nproc or 1)
        model = model or cfg.base_model_path
        if cfg.rl and not args.json:
            rows = (f"a micro-batch of {base.micro_batch // 2} pairs is {base.micro_batch} sequences (chosen and "
                    "rejected in one forward)" if cfg.rl in ("dpo", "orpo") else
                    f"a micro-batch of {base.micro_batch} rows (its KL rows run without autograd)")
            ref = "" if cfg.rl == "orpo" else "; the reference pass runs without autograd before the trained one, below its peak"
            console.print(f"[yellow]note:[/] rl: {cfg.rl}: {rows}; the estimate counts answers that fill each "
                          f"sequence, an upper bound{ref}", highlight=False)
        if cfg.unfrozen_parameters and not cfg.is_lora and not args.json:
            console.print("[yellow]note:[/] unfrozen_parameters: the estimate counts every parameter as trained "
                          "(gradients and optimizer states for all of them), an upper bound for training part of the "
                          "model", highlight=False)
    if not model:
        raise LorafitError("estimate: give a MODEL (e.g. llama-3.1-8b) or --config FILE")
    spec = resolve_spec(model)
    gpu_name, gpu_bytes = _gpu(args)
    s = _settings(args, base, device)
    if args.compare:
        dense = dict(four_bit=None, eight_bit=False)
        ests = [estimate(spec, replace(s, method="lora", **dense)), estimate(spec, replace(s, method="qlora", eight_bit=False))]
        if not s.fsdp:  # full fine-tuning is not sharded by FSDP2 yet: compared under DDP or one process only
            ests.insert(0, estimate(spec, replace(s, method="full", **dense)))
    else:
        ests = [estimate(spec, s)]
    if args.json:
        out = [dict(e.to_dict(), **_fit_dict(e, gpu_name, gpu_bytes)) for e in ests]
        print(json.dumps(out if args.compare else out[0], indent=2))
        return 0
    print_estimates(console, ests, gpu_name, gpu_bytes, explain=args.explain)
    return 0


def _fit_dict(e: Estimate, gpu_name, gpu_bytes) -> dict:
    if gpu_bytes is None:
        return {}
    return {"gpu": gpu_name, "gpu_bytes": gpu_bytes, "fits": e.total <= gpu_bytes, "margin_bytes": gpu_bytes - e.total}


def _label(e: Estimate) -> str:
    s = e.settings
    if s.method == "full":
        return "full fine-tuning"
    t = "all-linear" if s.targets == "all-linear" else ",".join(s.targets) if isinstance(s.targets, list) else s.targets
    return f"{'QLoRA' if s.four_bit else 'LoRA (int8 base)' if s.eight_bit else 'LoRA'} r={s.r} ({t})"


def print_estimates(console: Console, ests: list[Estimate], gpu_name=None, gpu_bytes=None, explain=False) -> None:
    e0 = ests[0]
    s = e0.settings
    matmuls = f" (LoRA matmuls on {s.effective_matmul_dtype} copies: faster on this CPU)" if s.upcast else ""
    console.print(f"[bold]{e0.spec.name}[/]: {e0.params['total'] / 1e9:.2f}B params | {s.dtype}{matmuls} | micro-batch "
                  f"{s.micro_batch} × {s.seq_len} tokens | {s.optimizer} | gradient checkpointing "
                  f"{'on' if s.gradient_checkpointing else 'off'} | loss {s.loss} | target {s.device}")
    if s.nproc > 1 or s.fsdp:
        how = ("FSDP2: weights, adapter, gradients and optimizer states sharded 1/N per decoder layer; the root "
               "group and the running layers gathered whole" if s.fsdp else
               "DDP: a whole replica on each rank, plus its gradient buckets")
        console.print(f"[bold]per rank[/] of {s.nproc} processes (each on its own device; micro-batch is per rank) — "
                      f"{how}", highlight=False)
    table = Table(show_header=True, header_style="bold")
    table.add_column("component")
    for e in ests:
        table.add_column(f"{_label(e)}\nGiB at peak", justify="right")
    if explain and len(ests) == 1:
        table.add_column("formula")
    for i, c in enumerate(e0.components):
        row = [c.name] + [_cell(e.components[i]) for e in ests]
        if explain and len(ests) == 1:
            row.append(c.formula)
        table.add_row(*row)
    row = ["[bold]total peak[/]"] + [f"[bold]{e.total / GiB:.2f}[/]" for e in ests]
    if explain and len(ests) == 1:
        row.append(f"largest moment: {e0.peak_moment}")
    table.add_row(*row)
    console.print(table)
    if explain and len(ests) > 1:
        for e in ests:
            console.print(f"[bold]{_label(e)}[/]")
            for c in e.components:
                console.print(f"  {c.name}: {c.formula}")
    for e in ests:
        console.print(f"{_label(e)}: peak at the {e.peak_moment}; trainable params {e.params['trainable']:,}")
        if gpu_bytes is not None:
            diff = gpu_bytes - e.total
            verdict = "[green]fits[/]" if diff >= 0 else "[red]does not fit[/]"
            word = "free" if diff >= 0 else "short"
            each = " each" if e.settings.nproc > 1 else ""
            console.print(f"  on {gpu_name}{each} ({gpu_bytes / GiB:.1f} GiB): {verdict} — {abs(diff) / GiB:.2f} GiB "
                          f"{word}{' per rank' if each else ''}")


def _cell(c) -> str:
    txt = f"{c.at_peak / GiB:.2f}"
    if c.bytes != c.at_peak:
        txt += f" (of {c.bytes / GiB:.2f})"
    return txt


def _print_catalog(console: Console) -> int:
    t = Table("model", "arch", "params", "hidden", "layers", "heads/kv", "vocab")
    for m in catalog.MODELS.values():
        t.add_row(m.name, m.arch, f"{m.total_params() / 1e9:.2f}B", str(m.hidden), str(m.layers),
                  f"{m.heads}/{m.kv_heads}", str(m.vocab))
    console.print(t)
    g = Table("GPU", "memory (GiB)")
    for name, b in catalog.GPUS.items():
        g.add_row(name, f"{b / GiB:.1f}")
    console.print(g)
    return 0


# ---- plan --------------------------------------------------------------------------------------------
def cmd_plan(args) -> int:
    from lorafit.memory.plan import search, to_yaml

    console = Console()
    spec = resolve_spec(args.model)
    gpu_name, gpu_bytes = _gpu(args)
    if gpu_bytes is None:
        raise LorafitError("plan: give --gpu NAME or --gpu-mem SIZE")
    if args.effective_batch <= 0:
        raise LorafitError(f"--effective-batch: got {args.effective_batch}, must be > 0")
    if not 0 <= args.margin < 1:
        raise LorafitError(f"--margin: got {args.margin}, must be in [0, 1)")
    out = Path(args.output)
    if out.exists() and not (args.force and out.is_file()):
        what = "is a folder" if out.is_dir() else "exists"
        fix = "give a file name" if out.is_dir() else "choose another name with -o, or pass --force to replace it"
        raise LorafitError(f"{out}: {what}; {fix}")
    s = _settings(args)
    if args.effective_batch % s.nproc:
        raise LorafitError(f"--effective-batch {args.effective_batch} is not a multiple of --nproc {s.nproc}: each "
                           "rank takes an equal share of every optimizer step")
    plan = search(spec, s, gpu_bytes, args.effective_batch, args.allow_shorter_seq, args.margin)
    if not plan.fits:
        console.print(f"[red]nothing fits[/] {spec.name} on {gpu_name} ({gpu_bytes / GiB:.1f} GiB, "
                      f"{plan.tried} settings tried): {plan.reason}")
        if plan.closest is not None:
            print_estimates(console, [plan.closest], gpu_name, gpu_bytes)
        return 1
    base_model, note = _base_model_for_config(args.model)
    if plan.note:
        console.print(f"[yellow]note:[/] {plan.note}", highlight=False)
    text = to_yaml(plan, base_model, args.effective_batch, note)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    print_estimates(console, [plan.estimate], gpu_name, gpu_bytes)
    ranks = f" × {s.nproc} ranks" if s.nproc > 1 else ""
    console.print(f"wrote {out} (micro-batch {plan.micro_batch} × {plan.grad_accum} accumulation steps{ranks})")
    if s.nproc > 1:
        console.print(f"train it on {s.nproc} devices: `lorafit train {out} --nproc {s.nproc}` (or torchrun "
                      f"--nproc-per-node {s.nproc} -m lorafit train {out})")
    console.print(f"before `lorafit train {out}`: set datasets" + (f", and base_model ({note})" if note else ""))
    return 0


def _base_model_for_config(model: str) -> tuple[str, str | None]:
    """What the written config's ``base_model`` says, and a note when it is a placeholder: ``train`` loads a
    local folder (written absolute, since the config may live elsewhere) or the demo model, never a catalog name."""
    if model in DEMO_ALIASES:
        return model, None
    p = Path(model).expanduser()
    if p.exists():
        return str((p.parent if p.name == "config.json" else p).resolve()), None
    return f"./models/{model}", f"edit: the folder where {model} is saved; lorafit downloads nothing"


# ---- measure -----------------------------------------------------------------------------------------
def cmd_measure(args) -> int:
    if args.steps <= 0:
        raise LorafitError(f"--steps: got {args.steps}, must be > 0")
    import torch

    from lorafit.config import load_config
    from lorafit.measure import every_rank, measure
    from lorafit.models import train_dtype

    cfg = load_config(args.config)
    spec = resolve_spec(cfg.base_model_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    nproc = int(os.environ.get("WORLD_SIZE", "1") or 1)  # under torchrun: every rank measures its own peak
    s = replace(settings_from_config(cfg, device, nproc=nproc), dtype=train_dtype(cfg))  # what training here picks
    real = None if args.random_weights else cfg.base_model_path
    if real is not None and real not in DEMO_ALIASES and not Path(real).exists():
        real = None
    ranks = every_rank(measure(spec, s, args.steps, model_name=real, device=device))
    if int(os.environ.get("RANK", "0") or 0):
        return 0  # rank 0 speaks for the job, with every rank's peak
    est = estimate(spec, s)
    errs = [100.0 * (est.allocated_peak - m.peak) / m.peak for m in ranks]
    if args.json:
        print(json.dumps({"estimate": est.to_dict(), "measured": [
            {"rank": m.rank, "peak": m.peak, "by_kind": m.by_kind, "device": m.device, "losses": m.losses}
            for m in ranks], "error_pct": errs if nproc > 1 else errs[0]}, indent=2))
        return 0
    what = f" per rank of {nproc} ({'FSDP2' if s.fsdp else 'DDP'})" if nproc > 1 else ""
    for m, err in zip(ranks, errs, strict=True):
        rows = _measure_rows(est, m)
        head = f"rank {m.rank}: " if nproc > 1 else ""
        t = Table("component", "estimate (MiB)", "measured (MiB)",
                  title=f"{head}{spec.name}: {args.steps} steps on {m.device}{what}")
        for name, e_b, m_b in rows:
            t.add_row(name, f"{e_b / 2**20:.1f}", "-" if m_b is None else f"{m_b / 2**20:.1f}")
        t.add_row("[bold]peak (tensors)[/]", f"{est.allocated_peak / 2**20:.1f}", f"{m.peak / 2**20:.1f}")
        Console().print(t)
        Console().print(f"{head}error {err:+.1f}% of the measured peak (estimate's peak moment: {est.peak_moment})")
    return 0


def _measure_rows(est: Estimate, m) -> list[tuple[str, int, int | None]]:
    c = {x.name: x.at_peak for x in est.components}
    k = m.by_kind
    weights = c["weights"] + sum(v for n, v in c.items() if n.startswith("trainable"))
    acts = c["activations"] + c["logits/loss"] + c["temporary peak"]
    # made during the step (MemTracker files FSDP2's gathered copies and DDP's buckets under several kinds:
    # compare the peaks, not these rows, under torchrun)
    acts += c.get("FSDP2 unsharded (root + layers)", 0) + c.get("DDP gradient buckets", 0)
    if not k:
        return [("weights", weights, None), ("gradients", c["gradients"], None),
                ("optimizer states", c["optimizer states"], None), ("activations + temporaries", acts, None)]
    return [("weights (+ buffers)", weights, k.get("Parameter", 0) + k.get("Buffer", 0)),
            ("gradients", c["gradients"], k.get("Gradient", 0)),
            ("optimizer states", c["optimizer states"], k.get("Optstate", 0)),
            ("activations + loss + temporaries", acts, k.get("Activation", 0) + k.get("Temp", 0) + k.get("Other", 0))]
