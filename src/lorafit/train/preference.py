"""Preference objectives (``rl: dpo``, ``rl: orpo``, ``rl: kto``) over a batch, as TRL's trainers compute them.

A batch holds the chosen sequences of its pairs first and the rejected ones after them
(:func:`lorafit.data.preference.pair_batches`), so both go through one forward, as TRL concatenates them. The
log-probability of an answer is summed over its tokens from the head's logits, through the same chunked
cross-entropy kernel as supervised training (one call for all sequences, summed per sequence: no full logits
tensor).

**DPO** (Rafailov et al. 2023; TRL's ``DPOTrainer``, ``loss_type="sigmoid"``)::

    loss = -logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))

with ``pi_*`` the trained model's summed answer log-probs and ``ref_*`` the reference's. The reference is the same
model with the adapter switched off, as TRL does for a PEFT model: no second copy of the model. Modules that the
adapter trains whole (``lora_modules_to_save``) keep a frozen copy of their starting weights for it, as PEFT keeps
their originals; an adapter continued from ``lora_model_dir`` keeps one of its own, and the reference is the model
with it as it started (TRL's "ref" copy of such an adapter), and so is PiSSA's starting adapter.

**ORPO** (Hong et al. 2024; TRL's ``ORPOTrainer``)::

    loss = nll(chosen) - alpha * logsigmoid(log_odds),   log_odds = (l_c - l_r) - (log(1 - e^l_c) - log(1 - e^l_r))

with ``l_*`` the answers' log-probs averaged over their tokens and ``nll`` the chosen sequences' mean token
cross-entropy over prompt and answer (TRL's choice, that of the ORPO authors' code). No reference model.

**KTO** (Ethayarajh et al. 2024; TRL's ``KTOTrainer``): unpaired rows, each desirable or not. With ``r`` the
completion's log-ratio ``pi - ref`` and ``z`` the batch's KL estimate (the mean log-ratio of its mismatched
prompt/completion rows, not differentiated, at least 0)::

    loss = w_d · (1 - sigmoid(beta (r - z)))  for a desirable row,   w_u · (1 - sigmoid(beta (z - r)))  otherwise

The forward returns the loss *summed over examples* (pairs; KTO's rows) and their number, so a step divides by all
its examples and each weighs the same (TRL averages per micro-batch: the same when micro-batches are full). ORPO's
nll, a token mean within the micro-batch as in TRL, enters once per pair. ``stats`` maps each of TRL's logged
metrics (``rewards/chosen`` ...) to ``(sum, count)``; the caller divides over the step.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.lora.inject import disable_adapter
from lorafit.options import RuntimeOptions
from lorafit.train.loss import (
    IGNORE_INDEX,
    decoder_stack,
    head_loss,
    hidden_states,
    options_of,
    trained_positions,
)

# the metrics a preference step logs (each averaged over its own rows: pairs, or KTO's rows of one kind), TRL's names
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen", "kl")


def sequence_logps(model: nn.Module, inputs: dict, labels: torch.Tensor, chunk_tokens: int | None,
                   options: RuntimeOptions, hidden: torch.Tensor | None = None):
    """Per sequence: the summed log-probability of its trained tokens, and how many there were; and the hidden
    states (for another loss over the same forward). One loss call over the trained tokens of all sequences, summed
    per sequence: its buffers (one chunk of logits; a trained head's gradient) are there once, not per sequence."""
    if hidden is None:
        hidden = hidden_states(model, decoder_stack(model), inputs, options.shared_prefix)
    rows, width = labels.shape
    h, targets, keep = trained_positions(hidden, labels)
    segments = keep.div(width - 1, rounding_mode="floor")  # the sequence of each trained position
    counts = torch.bincount(segments, minlength=rows)
    if keep.numel() == 0:
        return hidden.sum((1, 2)).float() * 0.0, counts, hidden
    return -head_loss(model, h, targets, chunk_tokens, options, segments, rows), counts, hidden


def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta: float):
    """Per pair: DPO's sigmoid loss, and the rewards beta·(pi - ref)."""
    chosen, rejected = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
    delta = chosen - rejected
    loss = -F.logsigmoid(delta)
    return loss, chosen.detach(), rejected.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, stable on both sides of -ln 2 (Mächler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_ratio(mean_c: torch.Tensor, mean_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair: logsigmoid of the log odds ratio of the chosen over the rejected answer, and the log odds ratio."""
    log_odds = (mean_c - mean_r) - (log1mexp(mean_c) - log1mexp(mean_r))
    return F.logsigmoid(log_odds), log_odds


def starting_weights(model: nn.Module, with_adapter: bool = False) -> dict[str, torch.Tensor]:
    """Frozen copies of the trainable parameters that are not the adapter's own (``lora_modules_to_save``, a trained
    bias), and the adapter's too when ``with_adapter``: the reference reads them as they were when training
    started."""
    adapter = () if with_adapter else ("lora_A", "lora_B", "lora_embedding_", "lora_magnitude")
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad and not any(a in n for a in adapter)}


@contextlib.contextmanager
def reference(model: nn.Module, originals: dict[str, torch.Tensor], with_adapter: bool = False):
    """The reference model within the block: no autograd, trainable weights at their start, and the adapter
    disabled (a fresh adapter starts as the base) unless ``with_adapter`` (a continued adapter, whose start
    ``originals`` holds: TRL's "ref" copy of it)."""
    params = dict(model.named_parameters())
    with torch.no_grad(), disable_adapter(model) if not with_adapter else contextlib.nullcontext():
        now = {n: params[n].data for n in originals}
        for n, t in originals.items():
            params[n].data = t
        try:
            yield model
        finally:
            for n, t in now.items():
                params[n].data = t


class PreferenceLoss(nn.Module):
    """The model's summed preference loss as a module's forward (what DDP wraps, as for
    :class:`~lorafit.train.distributed.LossModule`): ``forward(inputs, labels, chunk_tokens, options, desirable=None)``
    returns ``(loss summed over examples, examples)``. ``kind`` is ``"dpo"``, ``"orpo"`` or ``"kto"``; ``beta`` is
    DPO's and KTO's beta or ORPO's alpha; ``weights`` KTO's (desirable, undesirable) weights; ``desirable`` KTO's
    row flags. ``continued``: the adapter was loaded (``lora_model_dir``), so the reference is the model with that
    adapter as it starts, as TRL makes it for a PEFT model that already has one."""

    def __init__(self, model: nn.Module, kind: str, beta: float,
                 weights: tuple[float, float] = (1.0, 1.0), continued: bool = False):
        super().__init__()
        if kind not in ("dpo", "orpo", "kto"):
            raise ValueError(f"unknown preference objective {kind!r}")
        self.model, self.kind, self.beta = model, kind, beta
        self.weights, self.continued = weights, continued
        # not registered as buffers: they are no part of the model's state and never saved
        self.originals = starting_weights(model, continued) if kind != "orpo" else {}
        self.stats: dict[str, tuple[float, float]] = {}

    def forward(self, inputs: dict, labels: torch.Tensor, chunk_tokens: int | None = None,
                options: RuntimeOptions | None = None, desirable: torch.Tensor | None = None):
        options = options or options_of(self.model)
        n = labels.shape[0] // 2
        if self.kind == "dpo":
            return self._dpo(inputs, labels, chunk_tokens, options, n), n
        if self.kind == "kto":
            return self._kto(inputs, labels, chunk_tokens, options, desirable), n
        return self._orpo(inputs, labels, chunk_tokens, options, n), n

    def _dpo(self, inputs, labels, chunk_tokens, options, n: int) -> torch.Tensor:
        with reference(self.model, self.originals, self.continued):
            ref, _, _ = sequence_logps(self.model, inputs, labels, chunk_tokens, options)
        logps, _, _ = sequence_logps(self.model, inputs, labels, chunk_tokens, options)
        loss, chosen, rejected = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], self.beta)
        self._record(chosen, rejected, logps[:n].detach(), logps[n:].detach())
        return loss.sum()

    def _orpo(self, inputs, labels, chunk_tokens, options, n: int) -> torch.Tensor:
        sums, counts, hidden = sequence_logps(self.model, inputs, labels, chunk_tokens, options)
        means = sums / counts.clamp(min=1)
        ratio, log_odds = orpo_ratio(means[:n], means[n:])
        nll = self._chosen_nll(inputs, hidden[:n], chunk_tokens, options)
        self._record(self.beta * means[:n].detach(), self.beta * means[n:].detach(), means[:n].detach(),
                     means[n:].detach())
        self.stats.update({"nll_loss": (float(nll.detach()) * n, n), "log_odds_ratio": (float(ratio.sum()), n),
                           "log_odds_chosen": (float(log_odds.sum()), n)})
        return n * nll - self.beta * ratio.sum()

    def _kto(self, inputs, labels, chunk_tokens, options, desirable: torch.Tensor) -> torch.Tensor:
        """Rows ``[:n]`` are the batch's, rows ``[n:]`` its mismatched KL rows (lorafit.data.preference.kto_batches)."""
        n = labels.shape[0] // 2
        rows, kl_rows = _rows(inputs, slice(0, n)), _rows(inputs, slice(n, None))
        with reference(self.model, self.originals, self.continued):
            ref, _, _ = sequence_logps(self.model, inputs, labels, chunk_tokens, options)
        with torch.no_grad():
            kl_logps, _, _ = sequence_logps(self.model, kl_rows, labels[n:], chunk_tokens, options)
        kl = (kl_logps - ref[n:]).mean().clamp(min=0)
        logps, _, _ = sequence_logps(self.model, rows, labels[:n], chunk_tokens, options)
        ratio = logps - ref[:n]
        good = desirable.to(ratio.device).bool()
        w_good, w_bad = self.weights
        loss = torch.where(good, w_good * (1 - torch.sigmoid(self.beta * (ratio - kl))),
                           w_bad * (1 - torch.sigmoid(self.beta * (kl - ratio))))
        rewards = self.beta * ratio.detach()
        n_good, n_bad = int(good.sum()), int((~good).sum())
        self.stats = {"rewards/chosen": (float(rewards[good].sum()), n_good),
                      "rewards/rejected": (float(rewards[~good].sum()), n_bad),
                      "logps/chosen": (float(logps.detach()[good].sum()), n_good),
                      "logps/rejected": (float(logps.detach()[~good].sum()), n_bad), "kl": (float(kl), 1)}
        if n_good and n_bad:  # TRL's margin: the difference of the two means, where the batch has both kinds
            margin = float(rewards[good].mean() - rewards[~good].mean())
            self.stats["rewards/margins"] = (margin, 1)
        return loss.sum()

    def _chosen_nll(self, inputs, hidden, chunk_tokens, options) -> torch.Tensor:
        """Mean token cross-entropy of the chosen sequences over every real token, prompt included (TRL's)."""
        ids, mask = inputs["input_ids"][: hidden.shape[0]], inputs["attention_mask"][: hidden.shape[0]]
        h, y, _ = trained_positions(hidden, ids.masked_fill(mask == 0, IGNORE_INDEX))
        return head_loss(self.model, h, y, chunk_tokens, options) / max(int(y.numel()), 1)

    def _record(self, chosen, rejected, logps_c, logps_r) -> None:
        n = chosen.shape[0]
        self.stats = {"rewards/chosen": (float(chosen.sum()), n), "rewards/rejected": (float(rejected.sum()), n),
                      "rewards/accuracies": (float((chosen > rejected).float().sum()), n),
                      "rewards/margins": (float((chosen - rejected).sum()), n),
                      "logps/chosen": (float(logps_c.sum()), n), "logps/rejected": (float(logps_r.sum()), n)}


def _rows(inputs: dict, rows: slice) -> dict:
    return {k: v[rows] if torch.is_tensor(v) else v for k, v in inputs.items()}


def preference_loss(model: nn.Module, cfg) -> PreferenceLoss:
    """The objective a config's ``rl`` asks for (made once the model holds its starting weights). The model's own
    dropout layers are switched off, as TRL's trainers do by default (``disable_dropout``; lora_dropout is 0
    under rl already): policy and reference log-probs then differ only by the adapter."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    # The reference is the adapter as it starts, not the base under it, when the two differ: a continued adapter,
    # and PiSSA, whose start moves the top singular directions of W from the base into B A
    continued = bool(cfg.lora_model_dir) or cfg.lora_init == "pissa"
    if cfg.rl == "dpo":
        return PreferenceLoss(model, "dpo", cfg.dpo_beta, continued=continued)
    if cfg.rl == "kto":
        return PreferenceLoss(model, "kto", cfg.dpo_beta, continued=continued,
                              weights=(cfg.kto_desirable_weight or 1.0, cfg.kto_undesirable_weight or 1.0))
    return PreferenceLoss(model, "orpo", cfg.orpo_weight)


def eval_objective(model: nn.Module, cfg) -> PreferenceLoss:
    """The preference loss ``lorafit eval`` scores a saved adapter's eval split with: the reference is the base with
    the adapter switched off, as in a fresh adapter's run. A run whose reference was something else kept no copy
    of it (a continued or PiSSA adapter's start, the starting weights of modules trained whole): one line says so."""
    from lorafit.errors import LorafitError

    if cfg.rl != "orpo" and (cfg.lora_model_dir or cfg.lora_init == "pissa" or cfg.lora_modules_to_save):
        why = "lora_model_dir" if cfg.lora_model_dir else "lora_init: pissa" if cfg.lora_init == "pissa" \
            else "lora_modules_to_save"
        raise LorafitError(f"lorafit eval: rl: {cfg.rl} with {why} scores against the model as training started, "
                           "which is not kept after the run; read eval_loss and eval_rewards/* in its metrics.jsonl "
                           "(set eval_steps), or evaluate with --heldout / --retention")
    if cfg.rl == "dpo":
        return PreferenceLoss(model, "dpo", cfg.dpo_beta)
    if cfg.rl == "kto":
        return PreferenceLoss(model, "kto", cfg.dpo_beta,
                              weights=(cfg.kto_desirable_weight or 1.0, cfg.kto_undesirable_weight or 1.0))
    return PreferenceLoss(model, "orpo", cfg.orpo_weight)
