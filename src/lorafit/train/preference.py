"""Preference objectives (``rl: dpo``, ``rl: orpo``) over a batch of pairs, as TRL's trainers compute them.

A batch holds the chosen sequences of its pairs first and the rejected ones after them
(:func:`lorafit.data.preference.pair_batches`), so both go through one forward, as TRL concatenates them. The
log-probability of an answer is summed over its tokens from the head's logits, through the same chunked
cross-entropy kernel as supervised training (one call per sequence: no full logits tensor).

**DPO** (Rafailov et al. 2023; TRL's ``DPOTrainer``, ``loss_type="sigmoid"``)::

    loss = -logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))

with ``pi_*`` the trained model's summed answer log-probs and ``ref_*`` the reference's. The reference is the same
model with the adapter switched off, as TRL does for a PEFT model: no second copy of the model. Modules that the
adapter trains whole (``lora_modules_to_save``) keep a frozen copy of their starting weights for it, as PEFT keeps
their originals. ``dpo_label_smoothing`` ε gives conservative DPO: ``-(1-ε)·logsigmoid(βΔ) - ε·logsigmoid(-βΔ)``.

**ORPO** (Hong et al. 2024; TRL's ``ORPOTrainer``)::

    loss = nll(chosen) - alpha * logsigmoid(log_odds),   log_odds = (l_c - l_r) - (log(1 - e^l_c) - log(1 - e^l_r))

with ``l_*`` the answers' log-probs averaged over their tokens and ``nll`` the chosen sequences' mean token
cross-entropy over prompt and answer (TRL's choice, that of the ORPO authors' code). No reference model.

The forward returns the loss *summed over pairs* and the number of pairs, so a step divides by all its pairs and
each pair weighs the same (TRL averages per micro-batch: the same when micro-batches are full). ORPO's nll, a
token mean within the micro-batch as in TRL, enters once per pair. ``stats`` holds the sums of TRL's logged
metrics (``rewards/chosen`` ...), divided by the pairs of the step by the caller.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.lora.inject import disable_adapter
from lorafit.options import RuntimeOptions
from lorafit.train.loss import IGNORE_INDEX, head_loss, hidden_states, options_of

# the metrics a preference step logs (averaged over its pairs), in TRL's names
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen")


def sequence_logps(model: nn.Module, inputs: dict, labels: torch.Tensor, chunk_tokens: int | None,
                   options: RuntimeOptions, hidden: torch.Tensor | None = None):
    """Per sequence: the summed log-probability of its trained tokens, and how many there were; and the hidden
    states (for another loss over the same forward)."""
    if hidden is None:
        hidden = hidden_states(model, model.base_model, inputs, options.shared_prefix)
    sums, counts = [], []
    for r in range(hidden.shape[0]):
        keep = (labels[r, 1:] != IGNORE_INDEX).nonzero().squeeze(1)
        counts.append(int(keep.numel()))
        h = hidden[r, :-1].index_select(0, keep)
        sums.append(-head_loss(model, h, labels[r, 1:].index_select(0, keep), chunk_tokens, options)
                    if counts[-1] else hidden[r].sum() * 0.0)
    return torch.stack(sums).float(), torch.tensor(counts, device=hidden.device), hidden


def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta: float, label_smoothing: float = 0.0):
    """Per pair: DPO's sigmoid loss (cDPO with ``label_smoothing``), and the rewards beta·(pi - ref)."""
    chosen, rejected = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
    delta = chosen - rejected
    loss = -F.logsigmoid(delta) * (1 - label_smoothing) - F.logsigmoid(-delta) * label_smoothing
    return loss, chosen.detach(), rejected.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, stable on both sides of -ln 2 (Mächler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_ratio(mean_c: torch.Tensor, mean_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair: logsigmoid of the log odds ratio of the chosen over the rejected answer, and the log odds ratio."""
    log_odds = (mean_c - mean_r) - (log1mexp(mean_c) - log1mexp(mean_r))
    return F.logsigmoid(log_odds), log_odds


def trained_outside_adapter(model: nn.Module) -> dict[str, torch.Tensor]:
    """Frozen copies of the trainable parameters that are not the adapter's own (``lora_modules_to_save``, a trained
    bias): the reference reads them as they were when training started."""
    adapter = ("lora_A", "lora_B", "lora_embedding_", "lora_magnitude")
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad and not any(a in n for a in adapter)}


@contextlib.contextmanager
def reference(model: nn.Module, originals: dict[str, torch.Tensor]):
    """The reference model within the block: no autograd, the adapter disabled, trained modules at their start."""
    params = dict(model.named_parameters())
    with torch.no_grad(), disable_adapter(model):
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
    :class:`~lorafit.train.distributed.LossModule`): ``forward(inputs, labels, chunk_tokens, options)`` returns
    ``(loss summed over pairs, pairs)``; ``kind`` is ``"dpo"`` or ``"orpo"``, ``beta`` DPO's beta or ORPO's alpha."""

    def __init__(self, model: nn.Module, kind: str, beta: float, label_smoothing: float = 0.0):
        super().__init__()
        if kind not in ("dpo", "orpo"):
            raise ValueError(f"unknown preference objective {kind!r}")
        self.model, self.kind, self.beta, self.label_smoothing = model, kind, beta, label_smoothing
        # not registered as buffers: they are no part of the model's state and never saved
        self.originals = trained_outside_adapter(model) if kind == "dpo" else {}
        self.stats: dict[str, float] = {}

    def forward(self, inputs: dict, labels: torch.Tensor, chunk_tokens: int | None = None,
                options: RuntimeOptions | None = None):
        options = options or options_of(self.model)
        n = labels.shape[0] // 2
        if self.kind == "dpo":
            return self._dpo(inputs, labels, chunk_tokens, options, n), n
        return self._orpo(inputs, labels, chunk_tokens, options, n), n

    def _dpo(self, inputs, labels, chunk_tokens, options, n: int) -> torch.Tensor:
        with reference(self.model, self.originals):
            ref, _, _ = sequence_logps(self.model, inputs, labels, chunk_tokens, options)
        logps, _, _ = sequence_logps(self.model, inputs, labels, chunk_tokens, options)
        loss, chosen, rejected = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], self.beta, self.label_smoothing)
        self._record(chosen, rejected, logps[:n].detach(), logps[n:].detach())
        return loss.sum()

    def _orpo(self, inputs, labels, chunk_tokens, options, n: int) -> torch.Tensor:
        sums, counts, hidden = sequence_logps(self.model, inputs, labels, chunk_tokens, options)
        means = sums / counts.clamp(min=1)
        ratio, log_odds = orpo_ratio(means[:n], means[n:])
        nll = self._chosen_nll(inputs, hidden[:n], chunk_tokens, options)
        self._record(self.beta * means[:n].detach(), self.beta * means[n:].detach(), means[:n].detach(),
                     means[n:].detach())
        self.stats.update({"nll_loss": float(nll) * n, "log_odds_ratio": float(ratio.sum()),
                           "log_odds_chosen": float(log_odds.sum())})
        return n * nll - self.beta * ratio.sum()

    def _chosen_nll(self, inputs, hidden, chunk_tokens, options) -> torch.Tensor:
        """Mean token cross-entropy of the chosen sequences over every real token, prompt included (TRL's)."""
        ids, mask = inputs["input_ids"][: hidden.shape[0]], inputs["attention_mask"][: hidden.shape[0]]
        keep = mask[:, 1:].reshape(-1).nonzero().squeeze(1)
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, keep)
        y = ids[:, 1:].reshape(-1).index_select(0, keep)
        return head_loss(self.model, h, y, chunk_tokens, options) / max(int(keep.numel()), 1)

    def _record(self, chosen, rejected, logps_c, logps_r) -> None:
        self.stats = {"rewards/chosen": float(chosen.sum()), "rewards/rejected": float(rejected.sum()),
                      "rewards/accuracies": float((chosen > rejected).float().sum()),
                      "rewards/margins": float((chosen - rejected).sum()),
                      "logps/chosen": float(logps_c.sum()), "logps/rejected": float(logps_r.sum())}


def preference_loss(model: nn.Module, cfg) -> PreferenceLoss:
    """The objective a config's ``rl`` asks for."""
    if cfg.rl == "dpo":
        return PreferenceLoss(model, "dpo", cfg.dpo_beta, cfg.dpo_label_smoothing or 0.0)
    return PreferenceLoss(model, "orpo", cfg.orpo_weight)
