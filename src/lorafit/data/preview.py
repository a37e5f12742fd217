"""``lorafit preprocess config.yaml [--show N]``: tokenize the datasets, report, and show samples with the
trained tokens highlighted (bold green) and the masked ones dim, so a wrong mask is visible at a glance."""

from __future__ import annotations

from lorafit.data.build import DataReport, Sample, build_datasets
from lorafit.data.formats import IGNORE


def tokenizer_for(cfg):
    """The tokenizer named by ``tokenizer_config`` (else ``base_model``), with a pad token set.

    ``special_tokens`` entries that name tokens already in the vocabulary are applied; new tokens would need
    the model's embeddings resized, which the trainer does, so they are left to it.
    """
    from lorafit.models import load_tokenizer

    tok = load_tokenizer(cfg.tokenizer_config or cfg.base_model)
    vocab = tok.get_vocab()
    for name, value in (cfg.special_tokens or {}).items():
        if value in vocab and name in ("pad_token", "eos_token", "bos_token", "unk_token"):
            setattr(tok, name, value)
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
    for sample in train[:n]:
        console.print(Rule(f"{sample.source}  ({len(sample)} tokens, {sample.num_trained} trained)"))
        console.print(render_sample(sample, tok))
    console.print(Rule("data"))
    for line in report.lines():
        console.print(line)
    console.print("[bold green]trained[/] / [dim]masked[/] tokens")
    for note in cfg.notices:
        console.print(f"[yellow]notice[/] {note}")
    return report
