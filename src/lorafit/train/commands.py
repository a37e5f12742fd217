"""Verbs around training: ``train``, ``preprocess``, ``merge``, ``generate``, ``eval``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lorafit.errors import LorafitError
from lorafit.fsutil import atomic_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune from a YAML config (LoRA or full)")
    p.add_argument("config")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in output_dir")
    p.add_argument("--max-steps", type=int, help="override max_steps")
    p.add_argument("--output-dir", help="override output_dir")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("preprocess", help="tokenise the datasets of a config and show what is trained")
    p.add_argument("config")
    p.add_argument("--show", type=int, default=3, metavar="N", help="print N samples with trained tokens highlighted")
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("merge", help="merge an adapter into its base model and save a plain HF model")
    p.add_argument("base_model")
    p.add_argument("adapter")
    p.add_argument("output")
    p.add_argument("--dtype", default="float32", help="dtype of the saved model (float32 | bfloat16 | float16)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("generate", help="generate text from a model, with or without an adapter")
    p.add_argument("base_model")
    p.add_argument("prompt", nargs="+", help="prompt text (several prompts allowed)")
    p.add_argument("--adapter")
    p.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    p.add_argument("--system", help="system message for chat prompts")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="loss, task score and retention with and without an adapter")
    p.add_argument("config", help="training config (its base_model and eval split are used) or a model")
    p.add_argument("--adapter", help="adapter folder (default: the config's output_dir, if it holds one)")
    p.add_argument("--heldout", help="chat_template JSONL of held-out examples scored by exact match")
    p.add_argument("--retention", help="retention set JSONL (things the base model already does well)")
    p.add_argument("--limit", type=int, help="score only the first N held-out examples")
    p.add_argument("--no-base", action="store_true", help="with an adapter: skip the base-model column")
    p.add_argument("--json", dest="json_out", help="also write the results to this JSON file")
    p.set_defaults(func=cmd_eval)


def _load_cfg(path: str, **overrides):
    from lorafit.config import load_config

    cfg = load_config(path)
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg, k, v)
    return cfg


def cmd_train(args) -> int:
    from lorafit.train.trainer import train

    cfg = _load_cfg(args.config, max_steps=args.max_steps, output_dir=args.output_dir)
    console = Console()
    result = train(cfg, resume=args.resume, console=console)
    if result.interrupted:
        return 130
    lines = [f"done: {result.steps} steps in {result.wall_s:.0f} s ({result.tokens_per_s:.0f} tokens/s)",
             f"final train loss {result.train_loss:.4f}" if result.train_loss is not None else ""]
    if result.eval_loss is not None:
        lines.append(f"eval loss {result.eval_loss:.4f}")
    console.print(" | ".join(x for x in lines if x))
    console.print(f"wrote {result.output_dir} (adapter / model, metrics.jsonl, loss.png)")
    return 0


def cmd_preprocess(args) -> int:
    from lorafit.data.preview import show_samples

    show_samples(_load_cfg(args.config), args.show, Console())
    return 0


def _model_with_adapter(base_model: str, adapter: str | None, dtype="float32"):
    from lorafit.lora import load_adapter
    from lorafit.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(base_model, dtype)
    if adapter:
        load_adapter(model, adapter)
    model.eval()
    return model, tok


def cmd_merge(args) -> int:
    from lorafit.lora import merge_and_unload
    from lorafit.models import parse_dtype

    model, tok = _model_with_adapter(args.base_model, args.adapter)
    merge_and_unload(model, safe=True)
    model = model.to(parse_dtype(args.dtype))
    out = Path(args.output)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    Console().print(f"wrote merged model to {out} (loads with transformers' AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_generate(args) -> int:
    import torch

    model, tok = _model_with_adapter(args.base_model, args.adapter)
    console = Console()
    for prompt in args.prompt:
        if args.raw or not tok.chat_template:
            ids = tok(prompt, return_tensors="pt").input_ids
        else:
            msgs = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        torch.manual_seed(args.seed)
        kwargs = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p) if args.sample else dict(do_sample=False)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                 pad_token_id=tok.pad_token_id, **kwargs)
        console.print(f"[bold]> {prompt}[/]")
        console.print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip(), markup=False)
    return 0


def _eval_columns(args):
    """(base_model, adapter, cfg or None) from a config path or a model."""
    path = Path(args.config)
    if path.suffix in (".yaml", ".yml"):
        cfg = _load_cfg(args.config)
        adapter = args.adapter or (cfg.output_dir if (Path(cfg.output_dir) / "adapter_config.json").is_file() else None)
        return cfg.base_model, adapter, cfg
    return args.config, args.adapter, None


def evaluate_model(model, tok, cfg, heldout: str | None, retention: str | None, limit: int | None) -> dict:
    from lorafit import tasks

    out: dict = {}
    if cfg is not None and (cfg.val_set_size or cfg.test_datasets):
        from lorafit.data import build_datasets
        from lorafit.train.trainer import evaluate

        _, eval_samples, _ = build_datasets(cfg, tok)
        out.update({k: v for k, v in evaluate(model, eval_samples, cfg, tok.pad_token_id).items() if k != "eval_tokens"})
    if heldout:
        pairs = tasks.load_heldout(heldout)[:limit]
        max_new = max(len(tok(ref).input_ids) for _, ref in pairs) + 8
        preds = tasks.generate_answers(model, tok, [p for p, _ in pairs], max_new_tokens=max_new)
        out["heldout_exact_match"] = tasks.score(preds, [r for _, r in pairs])["exact_match"]
        out["_examples"] = list(zip([p[-1]["content"] for p, _ in pairs[:3]], preds[:3], [r for _, r in pairs[:3]], strict=True))
    if retention:
        r = tasks.retention_score(model, tok, retention)
        out["retention_accuracy"], out["retention_ppl"] = r["accuracy"], r["perplexity"]
    return out


def cmd_eval(args) -> int:
    from lorafit.lora import disable_adapter

    base_model, adapter, cfg = _eval_columns(args)
    if cfg is None and not (args.heldout or args.retention):
        raise LorafitError("give a training config (for its eval split), --heldout or --retention")
    model, tok = _model_with_adapter(base_model, adapter)
    results = {}
    if not adapter:  # a single model (a base, or a fully fine-tuned folder): one column
        results["model"] = evaluate_model(model, tok, cfg, args.heldout, args.retention, args.limit)
    elif not args.no_base:
        with disable_adapter(model):
            results["base"] = evaluate_model(model, tok, cfg, args.heldout, args.retention, args.limit)
    if adapter:
        results["adapter"] = evaluate_model(model, tok, cfg, args.heldout, args.retention, args.limit)
    print_eval(results, adapter)
    if args.json_out:
        clean = {k: {m: v for m, v in r.items() if not m.startswith("_")} for k, r in results.items()}
        Path(args.json_out).write_text(json.dumps(clean, indent=2) + "\n")
    return 0


LABELS = {
    "eval_loss": ("eval loss (nats/token)", "lower"),
    "eval_ppl": ("eval perplexity", "lower"),
    "heldout_exact_match": ("held-out exact match", "higher"),
    "retention_accuracy": ("retention: still correct", "higher"),
    "retention_ppl": ("retention: perplexity of base answers", "lower"),
}


def print_eval(results: dict, adapter: str | None) -> None:
    console = Console()
    cols = list(results)
    table = Table(title="evaluation" + (f" of {adapter}" if adapter else ""))
    table.add_column("metric")
    for c in cols:
        table.add_column(c, justify="right")
    metrics = [m for m in LABELS if any(m in r for r in results.values())]
    for m in metrics:
        vals = [results[c].get(m) for c in cols]
        fmt = (lambda v: f"{100 * v:.1f}%") if "exact" in m or "accuracy" in m else (lambda v: f"{v:.4f}")
        table.add_row(f"{LABELS[m][0]} ({LABELS[m][1]} is better)", *[fmt(v) if v is not None else "-" for v in vals])
    console.print(table)
    for c in cols:
        for prompt, pred, ref in results[c].get("_examples", []):
            console.print(f"[dim]{c}:[/] {prompt!r} → {pred!r} (expected {ref!r})", markup=True, highlight=False)
