"""What ``lorafit eval`` measures: eval loss, held-out exact match and retention, per model column.

Each column is one dict of metrics. Keys starting with ``_`` (a few example answers) are for display only and
are left out of the JSON report. Every phase reports its progress (:class:`~lorafit.train.progress.Phases`:
a bar on a terminal, lines in a log).

With an adapter, the ``base`` column runs with the adapter switched off and the ``adapter`` column with it
merged into the weights — the model ``lorafit merge`` writes. Generation then runs plain linear layers
instead of a LoRA branch per layer and token; logits equal the unmerged model's to fp32 rounding.
"""

from __future__ import annotations

from lorafit.data import build_datasets
from lorafit.eval import cache, tasks
from lorafit.lora import disable_adapter, merge, unmerge
from lorafit.train import evaluate
from lorafit.train.progress import Phases


def evaluate_model(model, tok, cfg, heldout: str | None, retention: str | None, limit: int | None,
                   phases: Phases | None = None, column: str = "model", eval_samples=None) -> dict:
    """The metrics each source given yields: the config's eval split, a held-out file, a retention file.
    ``eval_samples``: the config's eval split if already built (it is the same for every column)."""
    phases = phases or Phases()

    def phase(label, total):
        return phases.phase(f"{column}: {label}", total)

    out: dict = {}
    if has_eval_split(cfg):
        out.update(eval_split_metrics(model, tok, cfg, phase, eval_samples))
    if heldout:
        out.update(heldout_metrics(model, tok, heldout, limit, phase))
    if retention:
        r = tasks.retention_score(model, tok, retention, phase=phase)
        out["retention_accuracy"], out["retention_ppl"] = r["accuracy"], r["perplexity"]
    return out


def has_eval_split(cfg) -> bool:
    return cfg is not None and bool(cfg.val_set_size or cfg.test_datasets)


def eval_split_metrics(model, tok, cfg, phase=tasks.no_phase, eval_samples=None) -> dict:
    """Loss and perplexity on the config's eval split (built here unless given), as training reports them."""
    if eval_samples is None:
        _, eval_samples, _ = build_datasets(cfg, tok)
    with phase("eval loss", 1) as advance:
        metrics = evaluate(model, eval_samples, cfg, tok.pad_token_id)
        advance(1)
    return {k: v for k, v in metrics.items() if k != "eval_tokens"}


def heldout_metrics(model, tok, path: str, limit: int | None, phase=tasks.no_phase) -> dict:
    """Exact match of greedy answers on the first ``limit`` held-out examples, and three examples to show."""
    pairs = tasks.load_heldout(path)[:limit]
    references = [r for _, r in pairs]
    # room for the longest reference plus a little, so a wrong but longer answer is still seen in full
    max_new = max(len(tok(ref).input_ids) for ref in references) + 8
    # a row stops once it can no longer match its reference (its answer then ends with tasks.CUT)
    hopeless = [lambda text, ref=ref: not tasks.can_still_match(text, ref) for ref in references]
    with phase("held-out answers", len(pairs)) as advance:
        # batches of 128 (the demo's 100 prompts in one): a decode step reads every weight whatever the batch, and
        # on a CPU that costs as much as a 64-row step's arithmetic (0.15-0.5 s on the demo model)
        preds = tasks.generate_answers(model, tok, [p for p, _ in pairs], max_new_tokens=max_new, batch_size=128,
                                       on_batch=advance, settled=hopeless)
    examples = zip([p[-1]["content"] for p, _ in pairs[:3]], preds[:3], references[:3], strict=True)
    return {"heldout_exact_match": tasks.score(preds, references)["exact_match"], "_examples": list(examples)}


def evaluate_columns(model, tok, cfg, *, has_adapter: bool, with_base: bool, heldout: str | None,
                     retention: str | None, limit: int | None, phases: Phases | None = None,
                     base_key: str | None = None) -> dict[str, dict]:
    """One column ``model`` without an adapter; with one, ``base`` (adapter switched off, unless not
    ``with_base``) and ``adapter`` (merged, then unmerged again), both scored on the same loaded weights.
    ``base_key``: the base column's :mod:`lorafit.eval.cache` key — a stored column is reused (marked
    ``_cached``), a computed one stored."""
    # the eval split once for both columns (reading and tokenising take ~1 s); the adapter column always needs it
    eval_samples = build_datasets(cfg, tok)[1] if has_eval_split(cfg) else None

    def run(column: str) -> dict:
        return evaluate_model(model, tok, cfg, heldout, retention, limit, phases, column, eval_samples)

    if not has_adapter:  # a base model or a fully fine-tuned folder
        return {"model": run("model")}
    results = {}
    if with_base:
        cached = cache.load(base_key) if base_key else None
        if cached is not None:
            results["base"] = {**cached, "_cached": True}
        else:
            with disable_adapter(model):
                results["base"] = run("base")
            if base_key:
                cache.store(base_key, results["base"])
    merge(model)
    try:
        results["adapter"] = run("adapter")
    finally:
        unmerge(model)
    return results


def without_examples(results: dict[str, dict]) -> dict[str, dict]:
    """The results with display-only keys (``_examples``) dropped, for the JSON report."""
    return {col: {k: v for k, v in r.items() if not k.startswith("_")} for col, r in results.items()}
