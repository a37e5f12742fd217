"""One optimizer step, and the evaluation loss: the arithmetic of training, without the bookkeeping.

One optimizer step = ``gradient_accumulation_steps`` micro-batches on every rank. The loss of the step is the sum
of token losses over *all* its micro-batches (of all ranks) divided by the number of trained tokens in all of
them, so a short micro-batch does not weigh as much as a long one (the mean of per-batch means would), and 2 ranks
of micro-batch b step exactly as 1 process on the union of their batches.
"""

from __future__ import annotations

import contextlib
import math

import torch

from lorafit.data import Sample, batches, model_inputs
from lorafit.data.preference import preference_batches
from lorafit.options import RuntimeOptions
from lorafit.train.distributed import LossModule, World, all_sum, full_tensor, unwrapped
from lorafit.train.loss import options_of
from lorafit.train.preference import METRICS, eval_objective


def _on(batch: dict, device: torch.device) -> dict:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def micro_step(loss_module, batch, normaliser: int, chunk_tokens: int | None = None,
               options: RuntimeOptions | None = None, scale: float = 1.0, scaler=None) -> float:
    """Forward + backward of one micro-batch through ``loss_module`` (:class:`LossModule` or a preference loss, or
    DDP / FSDP2 around one); returns its summed loss (over tokens, or preference examples). ``scale``: the world
    size (the wrappers average gradients over ranks). ``scaler``: fp16's loss scaler (:func:`loss_scaler`); the loss is multiplied by its scale before backward."""
    loss_sum, _ = loss_module(model_inputs(batch), batch["labels"], chunk_tokens, options, **loss_extras(batch))
    if normaliser:
        loss = loss_sum * (scale / normaliser)
        (loss if scaler is None else scaler.scale(loss)).backward()
    return float(loss_sum.detach())


def loss_count(batch: dict) -> int:
    """What a micro-batch's summed loss is divided by in its step: its examples (preference pairs, KTO's rows),
    else its trained tokens."""
    return batch["num_examples"] if "num_examples" in batch else batch["num_trained_tokens"]


def loss_extras(batch: dict) -> dict:
    """What a preference loss reads beside the model's inputs: KTO's desirable/undesirable flags."""
    return {"desirable": batch["desirable"]} if "desirable" in batch else {}


def add_stats(into: dict, stats: dict) -> None:
    """Accumulate a loss module's metric ``(sum, count)`` pairs."""
    for k, (total, count) in stats.items():
        s, c = into.get(k, (0.0, 0.0))
        into[k] = (s + total, c + count)


def averaged(world: World, stats: dict, loss_module) -> dict:
    """Each metric's sum over its count, all ranks together; a metric with no count is left out. Every rank reduces
    the same keys (all of a preference loss's), whatever its own batches held."""
    if not hasattr(unwrapped(loss_module), "stats"):
        return {}
    flat = all_sum(world, *(x for k in METRICS for x in stats.get(k, (0.0, 0.0))))
    return {k: flat[2 * i] / flat[2 * i + 1] for i, k in enumerate(METRICS) if flat[2 * i + 1]}


def loss_scaler(dtype: torch.dtype, device: torch.device | str):
    """Dynamic loss scaling for an fp16 run, as HF's Trainer (through accelerate) does: torch's GradScaler with its
    defaults (scale 2**16, halved after a step with inf/nan gradients, doubled after 2000 good ones). Without it,
    small fp16 gradients flowing back through the frozen base underflow to zero. None for other dtypes: bf16
    has fp32's exponent range and needs no scaling."""
    if dtype != torch.float16:
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def _no_sync(loss_module, last: bool):
    """DDP's gradient all-reduce only after the last micro-batch of the step (FSDP2 reduces each: also exact)."""
    if last or not hasattr(loss_module, "no_sync"):
        return contextlib.nullcontext()
    return loss_module.no_sync()


def train_step(model, optimizer, scheduler, micro_batches: list[dict], max_grad_norm: float,
               chunk_tokens: int | None = None, options: RuntimeOptions | None = None, *,
               world: World | None = None, loss_module=None, scaler=None) -> dict:
    """One optimizer step over ``micro_batches``; returns loss (per trained token; per example for
    preference batches), grad norm, token counts and ``metrics`` (a preference loss's, see :func:`averaged`).

    ``chunk_tokens``: tokens per chunk of the loss (None: sized to the vocabulary). ``options``: the run's
    (None: those the model's lean kernels were applied with, else resolved here). Under torchrun, ``world`` and
    ``loss_module`` (the DDP / FSDP2 wrapper of :func:`lorafit.train.distributed.wrap`): then loss and token
    counts are those of all ranks together.

    ``scaler`` (fp16, :func:`loss_scaler`): the loss is scaled before backward and the gradients unscaled before
    clipping; a step whose gradients hold inf/nan is skipped — neither the optimizer nor the LR schedule moves, as
    accelerate does (``optimizer.step_was_skipped``) — and the scale is lowered. The row then has
    ``loss_scale`` (the scale this step's backward used) and ``skipped`` (True when it was skipped).
    """
    options = options or options_of(model)
    world = world or World.on(model)
    loss_module = loss_module or LossModule(model)
    local_trained = sum(b["num_trained_tokens"] for b in micro_batches)
    n_trained, n_loss = (int(x) for x in all_sum(world, local_trained, sum(map(loss_count, micro_batches))))
    local_total, stats = 0.0, {}
    for i, b in enumerate(micro_batches):
        with _no_sync(loss_module, i == len(micro_batches) - 1):
            local_total += micro_step(loss_module, _on(b, world.device), n_loss, chunk_tokens, options,
                                      scale=world.world_size, scaler=scaler)
        add_stats(stats, getattr(unwrapped(loss_module), "stats", {}))  # a preference loss's metrics
    local_tokens = sum(int(b["input_ids"].numel()) for b in micro_batches)
    total, tokens = all_sum(world, local_total, local_tokens)
    loss = total / max(n_loss, 1)
    metrics = averaged(world, stats, loss_module)
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "grad_norm": float("nan"), "trained_tokens": n_trained, "tokens": 0}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if scaler is not None:
        used_scale = scaler.get_scale()
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    if scaler is None:
        optimizer.step()
        skipped = False
    else:
        scaler.step(optimizer)  # skipped when unscale_ found inf/nan gradients
        scaler.update()
        skipped = scaler.get_scale() < used_scale  # the scale drops only after a skipped step (accelerate's test)
    if not skipped:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    row = {"loss": loss, "grad_norm": float(full_tensor(grad_norm)), "trained_tokens": n_trained,
           "tokens": int(tokens), "metrics": metrics}
    if scaler is not None:
        row.update(loss_scale=used_scale, skipped=skipped)
    return row


@torch.no_grad()
def evaluate(model, samples, cfg, pad_id: int, max_batches: int | None = None,
             options: RuntimeOptions | None = None, *, world: World | None = None, loss_module=None) -> dict:
    """Mean loss per trained token and perplexity on ``samples`` (under torchrun: each rank takes every
    world-size-th batch, and the sums are reduced across ranks; every rank runs as many forwards, as FSDP2 needs)."""
    if not samples:
        return {}
    options = options or options_of(model)
    world = world or World.on(model)
    if loss_module is None:  # lorafit eval: the config's objective, a preference loss under rl
        loss_module = eval_objective(model, cfg) if getattr(cfg, "rl", None) else LossModule(model)
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    eval_batches = _eval_batches(samples, cfg, pad_id)[:max_batches]
    inner, stats = unwrapped(loss_module), {}
    rounds = math.ceil(len(eval_batches) / world.world_size)
    for k in range(rounds):
        i = k * world.world_size + world.rank
        batch = _on(eval_batches[i if i < len(eval_batches) else 0], world.device)
        loss_sum, count = loss_module(model_inputs(batch), batch["labels"], cfg.loss_chunk_tokens, options,
                                      **loss_extras(batch))
        if i < len(eval_batches):  # a rank past the end runs a forward it does not count (FSDP2's all-gathers)
            total, n = total + float(loss_sum), n + count
            add_stats(stats, getattr(inner, "stats", {}))
    model.train(was_training)
    total, n = all_sum(world, total, n)
    mean = total / max(n, 1)
    if not isinstance(samples[0], Sample):  # n counts pairs (KTO: rows); a perplexity means nothing here
        return {"eval_loss": mean, "eval_examples": int(n),
                **{f"eval_{k}": v for k, v in averaged(world, stats, loss_module).items()}}
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0)), "eval_tokens": int(n)}


def _eval_batches(samples, cfg, pad_id: int) -> list[dict]:
    """Evaluation batches in length order: a batch pads less, and rows alike (one task's prompts) share a longer
    prefix (causal_lm_loss)."""
    samples = sorted(samples, key=len)
    if not isinstance(samples[0], Sample):
        return preference_batches(samples, micro_batch_size=cfg.micro_batch_size, sequence_len=cfg.sequence_len,
                                  pad_id=pad_id, shuffle=False, seed=cfg.seed, epoch=0)
    return batches(samples, micro_batch_size=cfg.micro_batch_size, sequence_len=cfg.sequence_len, pad_id=pad_id,
                   packing=False, shuffle=False, seed=cfg.seed, epoch=0)
