"""One optimizer step, and the evaluation loss: the arithmetic of training, without the bookkeeping.

One optimizer step = ``gradient_accumulation_steps`` micro-batches. The loss of the step is the sum of
token losses over *all* its micro-batches divided by the number of trained tokens in all of them, so a
short micro-batch does not weigh as much as a long one (the mean of per-batch means would).
"""

from __future__ import annotations

import math

import torch

from lorafit.data import batches, model_inputs
from lorafit.options import RuntimeOptions
from lorafit.train.loss import causal_lm_loss, options_of


def micro_step(model, batch, normaliser: int, chunk_tokens: int | None = None,
               options: RuntimeOptions | None = None) -> float:
    """Forward + backward of one micro-batch; returns its summed token loss."""
    loss_sum, _ = causal_lm_loss(model, model_inputs(batch), batch["labels"], chunk_tokens, options)
    if normaliser:
        (loss_sum / normaliser).backward()
    return float(loss_sum.detach())


def train_step(model, optimizer, scheduler, micro_batches: list[dict], max_grad_norm: float,
               chunk_tokens: int | None = None, options: RuntimeOptions | None = None) -> dict:
    """One optimizer step over ``micro_batches``; returns loss (per trained token), grad norm and token counts.

    ``chunk_tokens``: tokens per chunk of the loss (None: sized to the vocabulary). ``options``: the run's
    (None: those the model's lean kernels were applied with, else resolved here).
    """
    options = options or options_of(model)
    n_trained = sum(b["num_trained_tokens"] for b in micro_batches)
    total = sum(micro_step(model, b, n_trained, chunk_tokens, options) for b in micro_batches)
    loss = total / max(n_trained, 1)
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "grad_norm": float("nan"), "trained_tokens": n_trained, "tokens": 0}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(int(b["input_ids"].numel()) for b in micro_batches)
    return {"loss": loss, "grad_norm": float(grad_norm), "trained_tokens": n_trained, "tokens": tokens}


@torch.no_grad()
def evaluate(model, samples, cfg, pad_id: int, max_batches: int | None = None,
             options: RuntimeOptions | None = None) -> dict:
    """Mean loss per trained token and perplexity on ``samples``."""
    if not samples:
        return {}
    options = options or options_of(model)
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    eval_batches = batches(samples, micro_batch_size=cfg.micro_batch_size, sequence_len=cfg.sequence_len,
                           pad_id=pad_id, packing=False, shuffle=False, seed=cfg.seed, epoch=0)
    for batch in eval_batches[:max_batches]:
        loss_sum, k = causal_lm_loss(model, model_inputs(batch), batch["labels"], cfg.loss_chunk_tokens, options)
        total, n = total + float(loss_sum), n + k
    model.train(was_training)
    mean = total / max(n, 1)
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0)), "eval_tokens": n}

