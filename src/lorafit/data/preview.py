"""``lorafit preprocess config.yaml [--show N]``: tokenize the datasets, report, and show samples with the
trained tokens highlighted (bold green) and the masked ones dim, so a wrong mask is visible at a glance."""

from __future__ import annotations

from lorafit.data.build import DataReport, Sample, build_datasets
from lorafit.data.formats import IGNORE


def tokenizer_for(cfg):
    """The tokenizer training uses: ``tokenizer_config`` (else ``base_model``), its ``special_tokens`` set, a pad
    token always (new special tokens are checked as training checks them; the model is not loaded here)."""
    from lorafit.models import apply_special_tokens, load_tokenizer

    base = cfg.config_dir
    tok = load_tokenizer(cfg.tokenizer_config, base) if cfg.tokenizer_config else load_tokenizer(
        cfg.base_model, base, "base_model")
    apply_special_tokens(tok, cfg.special_tokens, trains_embeddings=cfg.trains_embeddings)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def preprocess(cfg, tokenizer=None) -> tuple[list[Sample], list[Sample], DataReport]:
    """Build the datasets as training would (same code path); returns ``(train, eval, report)``."""
    return build_datasets(cfg, tokenizer if tokenizer is not None else tokenizer_for(cfg))


def render_sample(sample: Sample, tokenizer):
    """A rich ``Text`` of the sample: trained runs bold green, masked runs dim."""
    from rich.text import Text

    text = Text()
    run: list[int] = []
    trained = None
    for tok_id, lab in zip(sample.input_ids, sample.labels, strict=True):
        t = lab != IGNORE
        if trained is not None and t != trained:
            text.append(tokenizer.decode(run), style="bold green" if trained else "dim")
            run = []
        trained = t
        run.append(tok_id)
    if run:
        text.append(tokenizer.decode(run), style="bold green" if trained else "dim")
    return text


def show_samples(cfg, n: int, console=None, tokenizer=None) -> DataReport:
    """Print the first ``n`` training samples (trained text highlighted) and the data report."""
    from rich.console import Console
    from rich.rule import Rule

    console = console or Console()
    tok = tokenizer if tokenizer is not None else tokenizer_for(cfg)
    train, _evals, report = preprocess(cfg, tok)
    for shown in train[:n]:
        for sample in shown.rows() if hasattr(shown, "rows") else [shown]:  # a preference pair: both sequences
            console.print(Rule(f"{sample.source}  ({len(sample)} tokens, {sample.num_trained} trained)"))
            console.print(render_sample(sample, tok))
    console.print(Rule("data"))
    for line in report.lines():
        console.print(line)
    console.print("[bold green]trained[/] / [dim]masked[/] tokens")
    for note in cfg.notices:
        console.print(f"[yellow]notice[/] {note}")
    return report
