"""The training loop, top to bottom: config → model + adapter → data → steps → adapter files and metrics.

One optimizer step = ``gradient_accumulation_steps`` micro-batches. The loss of the step is the sum of
token losses over *all* its micro-batches divided by the number of trained tokens in all of them, so a
short micro-batch does not weigh as much as a long one (the mean of per-batch means would).
"""

from __future__ import annotations

import math
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from lorafit import matmul
from lorafit.data import batches, build_datasets, model_inputs
from lorafit.errors import LorafitError
from lorafit.fsutil import atomic_dir
from lorafit.lora import LoraConfig, apply_lora, count_parameters, save_adapter
from lorafit.lora.group import use_shared_input_groups
from lorafit.models import load_model_and_tokenizer
from lorafit.train.attention import use_lean_attention
from lorafit.train.checkpoint import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from lorafit.train.gated_mlp import use_lean_gated_mlps
from lorafit.train.loss import causal_lm_loss
from lorafit.train.metrics import MetricsLog, plot_loss
from lorafit.train.optim import build_optimizer, build_scheduler
from lorafit.train.progress import TrainProgress
from lorafit.train.rms_norm import use_lean_rms_norms
from lorafit.train.rotary import use_lean_rotary


class TrainingDiverged(LorafitError):
    pass


class GracefulStop:
    """Ctrl-C / SIGTERM ask the loop to stop after the current optimizer step (then it checkpoints).

    Stopping between steps, never inside one, is what keeps the checkpoint consistent: weights, optimizer,
    RNG and data position all describe the same moment. A second Ctrl-C aborts at once.
    """

    def __init__(self):
        self.requested = False

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        self._old = {}
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    train_loss: float | None
    eval_loss: float | None = None
    tokens_per_s: float = 0.0
    wall_s: float = 0.0
    interrupted: bool = False
    history: list[dict] = field(default_factory=list)
    model: object = field(default=None, repr=False)  # the trained model, adapter attached


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lora_config_from(cfg) -> LoraConfig:
    return LoraConfig(
        r=cfg.lora_r,
        alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout,
        target_modules=cfg.lora_targets,
        use_rslora=cfg.peft_use_rslora,
        init=cfg.lora_init,
        modules_to_save=cfg.lora_modules_to_save,
        layers_to_transform=cfg.lora_layers_to_transform,
    )


def make_trainable(model, lora: LoraConfig | None, gradient_checkpointing: bool):
    """What training does to a loaded model: adapter (or unfreeze all), lean gated MLPs, RMSNorms, RoPE and
    half-precision attention, checkpointing, no cache.

    Shared with ``lorafit.memory.measure`` so the measured step is the trainer's own.
    """
    if lora is not None:
        apply_lora(model, lora)
    else:
        model.requires_grad_(True)
    use_shared_input_groups(model)
    use_lean_gated_mlps(model)
    use_lean_rms_norms(model)
    use_lean_rotary(model)
    use_lean_attention()
    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, so it works with a frozen embedding.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    return model


def prepare_model(cfg, console: Console | None = None):
    """Load the base model and tokenizer, attach the adapter (or unfreeze all for full fine-tuning)."""
    model, tokenizer = load_model_and_tokenizer(cfg.base_model, cfg.effective_dtype, tokenizer=cfg.tokenizer_config)
    make_trainable(model, lora_config_from(cfg) if cfg.is_lora else None, cfg.gradient_checkpointing)
    return model, tokenizer


def micro_step(model, batch, normaliser: int, chunk_tokens: int | None = None) -> float:
    """Forward + backward of one micro-batch; returns its summed token loss."""
    loss_sum, _ = causal_lm_loss(model, model_inputs(batch), batch["labels"], chunk_tokens)
    if normaliser:
        (loss_sum / normaliser).backward()
    return float(loss_sum.detach())


def train_step(model, optimizer, scheduler, micro_batches: list[dict], max_grad_norm: float,
               chunk_tokens: int | None = None) -> dict:
    """One optimizer step over ``micro_batches``; returns loss (per trained token), grad norm and token counts.

    ``chunk_tokens``: tokens per chunk of the loss (None: sized to the vocabulary, see ``train.loss``).
    """
    n_trained = sum(b["num_trained_tokens"] for b in micro_batches)
    total = sum(micro_step(model, b, n_trained, chunk_tokens) for b in micro_batches)
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
def evaluate(model, samples, cfg, pad_id: int, max_batches: int | None = None) -> dict:
    """Mean loss per trained token and perplexity on ``samples``."""
    if not samples:
        return {}
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    eval_batches = batches(samples, micro_batch_size=cfg.micro_batch_size, sequence_len=cfg.sequence_len,
                           pad_id=pad_id, packing=False, shuffle=False, seed=cfg.seed, epoch=0)
    for batch in eval_batches[:max_batches]:
        loss_sum, k = causal_lm_loss(model, model_inputs(batch), batch["labels"], cfg.loss_chunk_tokens)
        total, n = total + float(loss_sum), n + k
    model.train(was_training)
    mean = total / max(n, 1)
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0)), "eval_tokens": n}


def _matmul_note(model, rows: int) -> str:
    weight = model.get_output_embeddings().weight
    if not matmul.upcasts(weight.dtype, weight.device, rows):
        return ""
    return f" (frozen matmuls on fp32 copies: faster on this CPU; {matmul.ENV}=native to turn off)"


def _config_dump(cfg) -> dict:
    return cfg.model_dump(mode="json")


def train(cfg, resume: bool = False, console: Console | None = None, stop_after: int | None = None) -> TrainResult:
    """Run the fine-tune described by ``cfg``. ``stop_after``: stop (as if interrupted) after that many steps."""
    console = console or Console()
    out = Path(cfg.output_dir)
    seed_everything(cfg.seed)
    for notice in cfg.notices:
        console.print(f"[yellow]note:[/] {notice}")

    model, tokenizer = prepare_model(cfg, console)
    train_samples, eval_samples, report = build_datasets(cfg, tokenizer)
    console.print("data: " + report.summary())
    pad_id = tokenizer.pad_token_id

    def epoch_batches(epoch: int) -> list[dict]:
        return batches(train_samples, micro_batch_size=cfg.micro_batch_size, sequence_len=cfg.sequence_len,
                       pad_id=pad_id, packing=cfg.sample_packing, shuffle=True, seed=cfg.seed, epoch=epoch,
                       pad_to_sequence_len=cfg.pad_to_sequence_len)

    current = epoch_batches(0)
    steps_per_epoch = max(1, math.ceil(len(current) / cfg.gradient_accumulation_steps))
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * steps_per_epoch))
    eval_every = cfg.eval_steps or (max(1, steps_per_epoch // cfg.evals_per_epoch) if cfg.evals_per_epoch else None)
    save_every = cfg.save_steps or (max(1, steps_per_epoch // cfg.saves_per_epoch) if cfg.saves_per_epoch else None)

    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    state = TrainState()
    if resume:
        ckpt = Path(cfg.resume_from_checkpoint) if cfg.resume_from_checkpoint else latest_checkpoint(out)
        if ckpt is None:
            console.print(f"[yellow]note:[/] no complete checkpoint in {out}; starting from step 0")
        else:
            state = load_checkpoint(ckpt, model, optimizer, scheduler)
            console.print(f"resumed from {ckpt} (step {state.step}, epoch {state.epoch}, batch {state.batch_index})")
            if state.epoch:
                current = epoch_batches(state.epoch)
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=state.step if resume else None)
    params = count_parameters(model)
    console.print(f"{'LoRA' if cfg.is_lora else 'full fine-tuning'} | {params} | dtype {cfg.effective_dtype}"
                  f"{_matmul_note(model, cfg.micro_batch_size * cfg.sequence_len) if cfg.is_lora else ''} | "
                  f"{total_steps} steps of {cfg.micro_batch_size}×{cfg.gradient_accumulation_steps} "
                  f"({steps_per_epoch} per epoch)")
    config_dump = _config_dump(cfg)

    def checkpoint() -> Path:
        return save_checkpoint(out, model, optimizer, scheduler, state, config_dump,
                               keep=cfg.save_total_limit)

    last_loss = None
    t_start = time.perf_counter() - state.elapsed_s
    with GracefulStop() as stop, TrainProgress(total_steps, start=state.step, console=console) as progress:
        while state.step < total_steps and not stop.requested:
            group = []
            while len(group) < cfg.gradient_accumulation_steps:
                if state.batch_index >= len(current):
                    state.epoch, state.batch_index = state.epoch + 1, 0
                    current = epoch_batches(state.epoch)
                    if group:  # an accumulation group never spans two epochs
                        break
                    continue
                group.append(current[state.batch_index])
                state.batch_index += 1
            t0 = time.perf_counter()
            row = train_step(model, optimizer, scheduler, group, cfg.max_grad_norm, cfg.loss_chunk_tokens)
            if not math.isfinite(row["loss"]):
                raise TrainingDiverged(
                    f"loss became {row['loss']} at step {state.step + 1}; stopped without updating the weights "
                    f"(last good checkpoint: {latest_checkpoint(out) or 'none'}). Lower learning_rate or check the data"
                )
            dt = time.perf_counter() - t0
            state.step += 1
            state.tokens_seen += row["tokens"]
            state.elapsed_s = time.perf_counter() - t_start
            last_loss = row["loss"]
            record = {"step": state.step, "epoch": round(state.epoch + state.batch_index / max(len(current), 1), 4),
                      "loss": row["loss"], "lr": scheduler.get_last_lr()[0], "grad_norm": row["grad_norm"],
                      "trained_tokens": row["trained_tokens"], "tokens_per_s": row["tokens"] / dt,
                      "elapsed_s": round(state.elapsed_s, 3)}
            if eval_every and state.step % eval_every == 0 and eval_samples:
                record.update(evaluate(model, eval_samples, cfg, pad_id))
            metrics.write(record)
            progress.update(record)
            if save_every and state.step % save_every == 0 and state.step < total_steps:
                checkpoint()
            if stop_after is not None and state.step >= stop_after:
                stop.requested = True
    interrupted = state.step < total_steps
    if interrupted:
        path = checkpoint()
        console.print(f"[yellow]stopped:[/] saved {path}; continue with `lorafit train {cfg.source} --resume`")

    wall = time.perf_counter() - t_start
    result = TrainResult(out, state.step, last_loss, wall_s=wall, interrupted=interrupted,
                         tokens_per_s=state.tokens_seen / max(wall, 1e-9), history=metrics.rows())
    if interrupted:
        return result
    final_eval = evaluate(model, eval_samples, cfg, pad_id) if eval_samples else {}
    if final_eval:
        metrics.write({"step": state.step, **final_eval})
        result.eval_loss = final_eval["eval_loss"]
    save_final(model, tokenizer, cfg, out)
    method = f"LoRA r={cfg.lora_r}" if cfg.is_lora else "full fine-tuning"
    plot_loss(out / "metrics.jsonl", out / "loss.png", title=f"{Path(cfg.base_model).name} — {method}")
    result.history = metrics.rows()
    result.model = model
    return result


def save_final(model, tokenizer, cfg, out: Path) -> None:
    """The trained adapter in PEFT format (LoRA) or the full model (full fine-tuning), atomically."""
    if getattr(model, "lora_config", None) is not None:
        save_adapter(model, out, base_model=cfg.base_model)
    else:
        with atomic_dir(out / "model") as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
