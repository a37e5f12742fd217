"""From a config to tokenized train/eval samples: read rows, tokenize by format, truncate, split."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from lorafit.data.chat import ChatTokenizer, resolve_chat_template
from lorafit.data.formats import (
    IGNORE,
    TokenizerInfo,
    tokenize_alpaca,
    tokenize_completion,
    tokenize_input_output,
)
from lorafit.data.loading import RowError, iter_dataset
from lorafit.data.preference import KTOSample, KTOTokenizer, PairSample, PairTokenizer
from lorafit.errors import LorafitError


@dataclass
class Sample:
    """One tokenized example. ``labels`` are aligned with ``input_ids`` (HF convention: the loss shifts by
    one) and are -100 where the token is not trained."""

    input_ids: list[int]
    labels: list[int]
    source: str = ""  # file and line/row it came from

    def __len__(self) -> int:
        return len(self.input_ids)

    def key(self) -> tuple:
        return tuple(self.input_ids), tuple(self.labels)

    @property
    def num_trained(self) -> int:
        """Tokens that contribute to the loss: labels[1:] != -100 (position 0 is never predicted)."""
        return sum(1 for x in self.labels[1:] if x != IGNORE)


@dataclass
class DataReport:
    """What happened to the rows on their way to samples."""

    rows_read: int = 0
    bad_rows_skipped: int = 0
    dropped_no_trained_tokens: int = 0  # rows that had nothing to train (e.g. no assistant turn)
    truncated: int = 0  # samples cut to sequence_len and kept
    dropped_by_truncation: int = 0  # samples whose trained tokens were all beyond sequence_len
    duplicates_dropped: int = 0  # dataset_exact_deduplication: samples equal to an earlier one of their split
    train_samples: int = 0
    eval_samples: int = 0
    trained_tokens: int = 0  # train split, labels[1:] != -100
    total_tokens: int = 0  # train split
    eval_trained_tokens: int = 0
    bad_row_examples: list[str] = field(default_factory=list)  # first few skipped-row messages
    unit: str = "samples"  # "pairs" for preference data (a pair is two sequences; its answers are trained)

    def lines(self) -> list[str]:
        out = [
            f"rows read: {self.rows_read}",
            f"train {self.unit}: {self.train_samples} ({self.total_tokens} tokens, {self.trained_tokens} trained)",
            f"eval {self.unit}: {self.eval_samples} ({self.eval_trained_tokens} trained tokens)",
        ]
        if self.bad_rows_skipped:
            out.append(f"bad rows skipped: {self.bad_rows_skipped}")
            out += [f"  e.g. {m}" for m in self.bad_row_examples]
        if self.truncated:
            out.append(f"truncated to sequence_len: {self.truncated}")
        if self.dropped_by_truncation:
            out.append(f"dropped (nothing trained left after truncation): {self.dropped_by_truncation}")
        if self.duplicates_dropped:
            out.append(f"dropped (exact duplicates, dataset_exact_deduplication): {self.duplicates_dropped}")
        if self.dropped_no_trained_tokens:
            out.append(f"dropped (no trained tokens): {self.dropped_no_trained_tokens}")
        return out

    def summary(self) -> str:
        return "; ".join(self.lines())


def truncate(ids: list[int], labels: list[int], sequence_len: int) -> tuple[list[int], list[int]]:
    """Cut both to ``sequence_len`` at the same place (keeps the start; the mask stays aligned)."""
    return ids[:sequence_len], labels[:sequence_len]


def _row_tokenizer(spec, cfg, info: TokenizerInfo):
    rl = getattr(cfg, "rl", None)
    if rl:  # the config checked that every entry is of a type this rl reads
        return KTOTokenizer(spec, info) if rl == "kto" else PairTokenizer(spec, cfg, info)
    if spec.type.startswith("alpaca"):
        style = spec.type.partition(":")[2] or "instruct"
        return lambda row: tokenize_alpaca(row, info, cfg.train_on_inputs, style)
    if spec.type == "completion":
        return lambda row: tokenize_completion(row, info, spec.text_field)
    if spec.type == "input_output":
        return lambda row: tokenize_input_output(row, info, cfg.train_on_inputs)
    if spec.type == "chat_template":
        return ChatTokenizer(info, resolve_chat_template(cfg, info.tok), spec, cfg.train_on_inputs,
                             eot_tokens=cfg.eot_tokens, train_on_eos=cfg.train_on_eos,
                             system_message=cfg.default_system_message, source=cfg.source,
                             template_kwargs=cfg.chat_template_kwargs)
    raise LorafitError(f"{cfg.source}: unknown dataset type {spec.type!r}")  # pragma: no cover


def tokenize_specs(specs, key: str, cfg, tokenizer, report: DataReport) -> list[Sample]:
    """Read and tokenize every dataset in ``specs`` (the config list named ``key``)."""
    info = TokenizerInfo(tokenizer)
    samples: list[Sample] = []
    for i, spec in enumerate(specs):
        fn = _row_tokenizer(spec, cfg, info)
        for row, where in iter_dataset(spec, f"{key}[{i}]", cfg):
            report.rows_read += 1
            try:
                if isinstance(row, RowError):
                    raise row
                out = fn(row)
            except RowError as e:
                if not cfg.skip_bad_rows:
                    raise LorafitError(f"{where}: {e} (set skip_bad_rows: true to skip bad rows)") from None
                report.bad_rows_skipped += 1
                if len(report.bad_row_examples) < 3:
                    report.bad_row_examples.append(f"{where}: {e}")
                continue
            sample = _preference(out, where, cfg.sequence_len, report) if isinstance(out, PairSample | KTOSample) \
                else _sample(*out, where, cfg.sequence_len, report)
            if sample is not None:
                samples.append(sample)
    return samples


def _sample(ids: list[int], labels: list[int], where: str, sequence_len: int, report: DataReport) -> Sample | None:
    """A supervised sample cut to ``sequence_len``; None (counted) when nothing is trained in it."""
    if len(ids) != len(labels):  # pragma: no cover - a bug in a format, not in the data
        raise AssertionError(f"{where}: {len(ids)} ids but {len(labels)} labels")
    if not any(x != IGNORE for x in labels[1:]):
        report.dropped_no_trained_tokens += 1
        return None
    if len(ids) > sequence_len:
        ids, labels = truncate(ids, labels, sequence_len)
        if not any(x != IGNORE for x in labels[1:]):
            report.dropped_by_truncation += 1
            return None
        report.truncated += 1
    return Sample(ids, labels, where)


def _preference(sample, where: str, sequence_len: int, report: DataReport):
    """A preference pair (or KTO row) cut to ``sequence_len``; None (counted) when the prompt leaves no room for
    an answer."""
    sample.source = where
    cut = sample.truncated(sequence_len)
    if cut is None:
        report.dropped_by_truncation += 1
    elif len(cut) != len(sample):
        report.truncated += 1
    return cut


def deduplicate(samples: list[Sample], report: DataReport) -> list[Sample]:
    """Keep the first of samples with the same ids and labels (pairs: the same prompt and answers) (axolotl's exact deduplication hashes each
    tokenized row); the order is kept."""
    seen: set[tuple] = set()
    kept = []
    for s in samples:
        key = s.key()
        if key in seen:
            report.duplicates_dropped += 1
            continue
        seen.add(key)
        kept.append(s)
    return kept


def split_samples(samples: list[Sample], val_set_size: float | int, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Seeded split: ``val_set_size`` < 1 is a fraction, >= 1 a count. Order within each part is kept."""
    if not val_set_size or not samples:
        return list(samples), []
    n = len(samples)
    n_eval = int(val_set_size) if val_set_size >= 1 else max(1, round(val_set_size * n))
    if n_eval >= n:
        raise LorafitError(f"val_set_size {val_set_size} leaves no training samples out of {n}")
    picked = set(random.Random(seed).sample(range(n), n_eval))
    train = [s for i, s in enumerate(samples) if i not in picked]
    evals = [s for i, s in enumerate(samples) if i in picked]
    return train, evals


def build_datasets(cfg, tokenizer) -> tuple[list[Sample], list[Sample], DataReport]:
    """Read, tokenize, truncate and split the config's datasets.

    Returns ``(train, eval, report)``. ``eval`` comes from ``test_datasets`` when given, otherwise from a
    seeded ``val_set_size`` split of the training rows. Bad rows raise a one-line :class:`LorafitError`
    naming file and line, or are skipped and counted with ``skip_bad_rows: true``.
    """
    rl = getattr(cfg, "rl", None)
    report = DataReport(unit={None: "samples", "kto": "rows"}.get(rl, "pairs"))
    train = tokenize_specs(cfg.datasets, "datasets", cfg, tokenizer, report)
    if cfg.dataset_exact_deduplication:  # as axolotl: each split on its own, before val_set_size splits
        train = deduplicate(train, report)
    if cfg.test_datasets:
        evals = tokenize_specs(cfg.test_datasets, "test_datasets", cfg, tokenizer, report)
        if cfg.dataset_exact_deduplication:
            evals = deduplicate(evals, report)
    else:
        train, evals = split_samples(train, cfg.val_set_size, cfg.seed)
    if not train:
        raise LorafitError(f"{cfg.source}: no training samples left ({report.summary()})")
    report.train_samples = len(train)
    report.eval_samples = len(evals)
    report.total_tokens = sum(len(s) for s in train)
    report.trained_tokens = sum(s.num_trained for s in train)
    report.eval_trained_tokens = sum(s.num_trained for s in evals)
    return train, evals, report
