"""``lorafit eval``: loss, held-out score and retention of a model, with and without its adapter."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lorafit.cli.loading import add_qlora_flag, base_for, model_with_adapter
from lorafit.errors import LorafitError
from lorafit.fsutil import check_new_file, write_json

# metric key -> (row label, which direction is better)
LABELS = {
    "eval_loss": ("eval loss (nats/token)", "lower"),
    "eval_ppl": ("eval perplexity", "lower"),
    "eval_rewards/accuracies": ("eval reward accuracy (chosen over rejected)", "higher"),
    "eval_rewards/margins": ("eval reward margin", "higher"),
    "heldout_exact_match": ("held-out exact match", "higher"),
    "retention_accuracy": ("retention: still correct", "higher"),
    "retention_ppl": ("retention: perplexity of base answers", "lower"),
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="loss, task score and retention with and without an adapter")
    p.add_argument("config", help="training config (its base_model and eval split are used) or a model")
    p.add_argument("--adapter", help="adapter folder (default: the config's output_dir if it holds one, "
                   "else its lora_model_dir)")
    add_qlora_flag(p, "score over")  # a config with adapter: qlora implies it
    p.add_argument("--heldout", help="chat_template JSONL of held-out examples scored by exact match")
    p.add_argument("--retention", help="retention set JSONL (things the base model already does well)")
    p.add_argument("--limit", type=int, help="score only the first N held-out examples")
    p.add_argument("--no-base", action="store_true", help="with an adapter: skip the base-model column")
    p.add_argument("--no-cache", action="store_true",
                   help="score the base column again instead of reusing its stored result (it is stored again)")
    p.add_argument("--json", dest="json_out", help="also write the results to this JSON file")
    p.add_argument("--force", action="store_true", help="replace the --json file if it exists")
    p.set_defaults(func=cmd_eval)


def resolve_target(args):
    """``(base_model, adapter, cfg or None)`` from a config path or a model name."""
    if Path(args.config).suffix not in (".yaml", ".yml"):
        return args.config, args.adapter, None
    from lorafit.config import load_config

    cfg = load_config(args.config)
    trained = cfg.output_path / "adapter_config.json"
    start = str(cfg.resolve_path(cfg.lora_model_dir)) if cfg.lora_model_dir else None  # the adapter it starts from
    adapter = args.adapter or (str(cfg.output_path) if trained.is_file() else start)
    return cfg.base_model_path, adapter, cfg


def cmd_eval(args) -> int:
    quiet_threads()
    from lorafit.eval.report import evaluate_columns, without_examples
    from lorafit.train.progress import Phases

    if args.json_out:  # before the slow part, and never over a file unasked
        check_new_file(args.json_out, "--json", args.force)
    base_model, adapter, cfg = resolve_target(args)
    if cfg is None and not (args.heldout or args.retention):
        raise LorafitError("give a training config (for its eval split), --heldout or --retention")
    default = {"four_bit": cfg.four_bit, "eight_bit": cfg.load_in_8bit,
               "moe_experts": cfg.quantize_moe_experts,
               "linearized_experts": cfg.llama4_linearized_experts} if cfg is not None else None
    held = base_for(adapter, args.qlora, args.base_8bit, Console(), default=default)
    model, tok = model_with_adapter(base_model, adapter, **held)
    key = None
    if adapter and not args.no_base:
        from lorafit.eval import cache

        quantized = "int8" if held["eight_bit"] else held["four_bit"]  # a 4-bit key as before 8-bit bases
        if held.get("moe_experts"):
            quantized = (quantized, "moe experts")
        key = cache.base_key(base_model, cfg, args.heldout, args.retention, args.limit, quantized=quantized)
        if args.no_cache:
            cache.forget(key)
    results = evaluate_columns(model, tok, cfg, has_adapter=bool(adapter), with_base=not args.no_base,
                               heldout=args.heldout, retention=args.retention, limit=args.limit,
                               phases=Phases(Console()), base_key=key)
    print_eval(results, adapter)
    if args.json_out:
        write_json(args.json_out, without_examples(results))
    return 0


def quiet_threads() -> None:
    """Idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE`` unless the user set it), read
    when torch loads, so call this first. Eval runs many short parallel regions (a decode step per token); on a
    CPU shared with other work a spinning thread whose partner is descheduled burns its core waiting: the loss of
    24 of the demo's eval samples took 19-32 s with 2 spinning threads on a loaded 2-core machine (load 4), 4-9 s
    with sleeping ones, 4-6 s with one thread (benchmarks/eval_phases.py times the whole eval)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def cache_note() -> str:
    from lorafit.eval.cache import cache_dir
    from lorafit.fsutil import display

    return f"kept in {display(cache_dir())}"


def _fmt(metric: str, v) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if "exact" in metric or "accuracy" in metric else f"{v:.4f}"


def print_eval(results: dict, adapter: str | None) -> None:
    """One table, a row per metric any column has and a column per model, then the example answers."""
    from lorafit.eval.tasks import CUT

    console = Console()
    cols = list(results)
    table = Table(title="evaluation" + (f" of {adapter}" if adapter else ""))
    table.add_column("metric")
    for c in cols:
        table.add_column(c, justify="right")
    per_example = any("eval_examples" in r for r in results.values())  # rl: a loss per pair (KTO: per row)
    for m, (label, better) in LABELS.items():
        if m == "eval_loss" and per_example:
            label = "eval loss (per example)"
        if any(m in r for r in results.values()):
            table.add_row(f"{label} ({better} is better)", *[_fmt(m, results[c].get(m)) for c in cols])
    console.print(table)
    if any(r.get("_cached") for r in results.values()):
        console.print(f"[dim]base column: stored result of an earlier run with the same base model, files and "
                      f"settings ({cache_note()}; --no-cache recomputes it)[/]", highlight=False)
    cut = False
    for c in cols:
        for prompt, pred, ref in results[c].get("_examples", []):
            cut = cut or pred.endswith(CUT)
            console.print(f"[dim]{c}:[/] {prompt!r} → {pred!r} (expected {ref!r})",
                          markup=True, highlight=False)
    if cut:
        console.print(f"[dim]an answer ending in {CUT.strip()!r} was stopped there: it could no longer match, "
                      "so the rest was not generated[/]", highlight=False)
