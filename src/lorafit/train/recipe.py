"""The fine-tuning recipe, top to bottom: config → model + adapter → data → optimizer → steps → files.

:class:`Recipe` holds one run. Its phases, in the order :meth:`Recipe.run` calls them:

1. ``setup_model`` — seed, load the base, attach the adapter, switch on the lean kernels;
2. ``setup_data`` — tokenise the datasets, lay out the first epoch's batches;
3. ``setup_optimizer`` — optimizer and schedule, then ``resume`` from a checkpoint if asked, then
   ``prepare_output`` (the output folder as :mod:`lorafit.train.run_record` planned it when the recipe was built);
4. the loop — ``next_micro_batches`` → ``step`` → ``log`` (and ``evaluate`` / ``checkpoint`` on their steps);
5. ``finish`` — final evaluation, the adapter (or model) files, the loss plot.

Runtime options (compiled kernels, bf16 matmul mode) are resolved once, from the config, at the start, and
handed to every piece that needs them. Before any of it, the output folder is checked against the run
(:mod:`lorafit.train.run_record`): a run never replaces another run's outputs or a user's files unasked.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from lorafit._compat import compile_stats
from lorafit.data import batches, build_datasets
from lorafit.data.preference import preference_batches
from lorafit.errors import LorafitError
from lorafit.fsutil import atomic_dir, check_writable_dir, display
from lorafit.linearized import save_pretrained
from lorafit.lora import adapter_state_dict, count_parameters, save_adapter
from lorafit.models import train_dtype
from lorafit.train.auto_batch import resolve_auto_batch
from lorafit.train.checkpoint import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from lorafit.train.distributed import all_sum, barrier, held_codes, held_fraction, init_world, shutdown, wrap
from lorafit.train.metrics import MetricsInMemory, MetricsLog, plot_loss
from lorafit.train.optim import optimizer_from_config, scheduler_from_config
from lorafit.train.preference import METRICS, preference_loss
from lorafit.train.progress import TrainProgress
from lorafit.train.run_record import fingerprint, plan_output, prepare_output
from lorafit.train.setup import prepare_model, seed_everything
from lorafit.train.step import evaluate, loss_scaler, train_step
from lorafit.train.stop import GracefulStop

log = logging.getLogger(__name__)


def logged(window: list[dict]) -> dict:
    """One metrics row for the steps since the last one (``logging_steps``): the last step's row, with loss,
    gradient norm and throughput averaged over the window, as transformers' Trainer logs them."""
    row = dict(window[-1])
    if len(window) > 1:
        for key in ("loss", "grad_norm", "tokens_per_s", *METRICS):
            values = [r[key] for r in window if key in r]  # a KTO step with one kind of row has no rewards/rejected
            if values:
                row[key] = sum(values) / len(values)
        row["trained_tokens"] = sum(r["trained_tokens"] for r in window)
        row["logged_steps"] = len(window)
    skipped = sum(bool(r.get("skipped")) for r in window)  # fp16: steps the loss scaler skipped (inf/nan grads)
    row.pop("skipped", None)
    if skipped:
        row["skipped_steps"] = skipped
    return row


class TrainingDiverged(LorafitError):
    pass


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    train_loss: float | None
    eval_loss: float | None = None
    tokens_per_s: float = 0.0
    wall_s: float = 0.0
    interrupted: bool = False
    compiles: int = 0  # graphs torch.compile built in this run (the fused kernels; a recompile counts again)
    compile_s: float = 0.0  # seconds spent compiling them
    history: list[dict] = field(default_factory=list)
    model: object = field(default=None, repr=False)  # the trained model, adapter attached
    rank: int = 0  # under torchrun: this process's rank (only rank 0 writes files and prints)


def train(cfg, resume: bool = False, console: Console | None = None, stop_after: int | None = None,
          overwrite: bool = False) -> TrainResult:
    """Run the fine-tune described by ``cfg``. ``stop_after``: stop (as if interrupted) after that many steps;
    ``overwrite``: replace another run's outputs in output_dir (never other files)."""
    recipe = Recipe(cfg, console, resume=resume, overwrite=overwrite)
    try:
        return recipe.run(stop_after=stop_after)
    finally:
        shutdown(recipe.world)


class Recipe:
    """One training run of a :class:`~lorafit.config.TrainConfig`.

    Built before anything loads: a run that may not write its output folder (or may not resume
    its checkpoint) fails here with one line, and nothing on disk has changed. ``resume``: continue from the
    newest checkpoint in output_dir (a config's ``resume_from_checkpoint`` names one and implies it).
    """

    def __init__(self, cfg, console: Console | None = None, resume: bool = False, overwrite: bool = False):
        self.cfg = cfg
        # one process, or this rank of a torchrun launch
        self.world = init_world(fsdp=cfg.fsdp_enabled, single_ok=cfg.deepspeed is not None)
        self.console = console or Console()
        if not self.world.is_main:  # rank 0 speaks for the job; the others print their errors only
            self.console = Console(quiet=True)
        try:
            self.out = check_writable_dir(cfg.output_path, "output_dir")
            self.batch_note = resolve_auto_batch(cfg, train_dtype(cfg))  # numbers for "auto", before they are recorded
            self.fingerprint = fingerprint(cfg)  # what the outputs mean; recorded with them
            named = cfg.resolve_path(cfg.resume_from_checkpoint) if cfg.resume_from_checkpoint else None
            self.plan = plan_output(self.out, self.fingerprint, resume or named is not None, overwrite, named)
            self.options = cfg.runtime_options()  # resolved once for the whole run
            self.config_dump = cfg.model_dump(mode="json")  # what every checkpoint records
            self.state = TrainState()
            barrier(self.world)  # every rank has read the output folder before rank 0 may change it
        except BaseException:
            shutdown(self.world)
            raise

    # ---- the run, in order ------------------------------------------------------------------------------
    def run(self, stop_after: int | None = None) -> TrainResult:
        self.setup_model()
        self.setup_data()
        self.setup_optimizer()
        resumed = self.plan.resume_from is not None
        if resumed:
            self.resume()
        self.prepare_output()  # the first change on disk: a bad model or dataset has failed by now
        self.metrics = (MetricsLog(self.out / "metrics.jsonl", resume_step=self.state.step if resumed else None)
                        if self.world.is_main else MetricsInMemory())
        self.print_header()
        self.last_loss = None
        self.last_eval: tuple[int, dict] | None = None  # (step, metrics) of the latest evaluation
        self.t_start = time.perf_counter() - self.state.elapsed_s
        self.compiled_at_start, self.compiles_logged = compile_stats(), 0
        window: list[dict] = []  # the steps since the last metrics row (logging_steps)
        compiling = self.options.compile and self.compiled_at_start[0] == 0
        with GracefulStop() as stop, TrainProgress(self.total_steps, self.state.step, self.console,
                                                   compiling=compiling) as progress:
            while self.state.step < self.total_steps and not self.stop_requested(stop):
                record = self.step(self.next_micro_batches())
                window.append(record)
                if self.due(self.eval_every):  # None when there is nothing to evaluate or eval_strategy is "no"
                    self.last_eval = (self.state.step, self.evaluate())
                    record.update(self.last_eval[1])
                if self.due(self.cfg.logging_steps) or "eval_loss" in record or self.state.step == self.total_steps:
                    self.metrics.write(logged(window))
                    window = []
                progress.update(record)
                if self.due(self.save_every) and self.state.step < self.total_steps:
                    self.checkpoint()
                if stop_after is not None and self.state.step >= stop_after:
                    stop.requested = True
        return self.finish()

    def stop_requested(self, stop: GracefulStop) -> bool:
        """Ctrl-C / SIGTERM on any rank stops every rank after the same step (one all-reduce per step)."""
        if not self.world.distributed:
            return stop.requested
        (n,) = all_sum(self.world, float(stop.requested))
        stop.requested = n > 0
        return stop.requested

    # ---- set-up -----------------------------------------------------------------------------------------
    def setup_model(self) -> None:
        seed_everything(self.cfg.seed)  # the same on every rank: the adapter starts equal everywhere
        for notice in self.cfg.notices:
            self.console.print(f"[yellow]note:[/] {notice}")
        if self.batch_note:
            self.console.print(self.batch_note)
        self.model, self.tokenizer = prepare_model(self.cfg, self.options)
        for notice in (getattr(self.model, "attention_notice", None), self.model.lean_kernels.notice):
            if notice:
                self.console.print(f"[yellow]note:[/] {notice}")
        fsdp_config = self.cfg.fsdp_config or {}
        reshard = fsdp_config.get("reshard_after_forward", fsdp_config.get("fsdp_reshard_after_forward", True))
        # the model and its loss (causal LM, or rl's preference objective) as one module; under torchrun, DDP or
        # FSDP2 around it
        objective = {"objective": lambda model: preference_loss(model, self.cfg)} if self.cfg.rl else {}
        self.loss_module = wrap(self.model, self.world, reshard_after_forward=bool(reshard), **objective)
        if self.world.distributed:  # each rank its own dropout masks, reproducibly
            torch.manual_seed(self.cfg.seed + 1_000_003 * self.world.rank)

    def setup_data(self) -> None:
        cfg = self.cfg
        self.train_samples, self.eval_samples, report = build_datasets(cfg, self.tokenizer)
        self.console.print("data: " + report.summary())
        self.pad_id = self.tokenizer.pad_token_id
        self.epoch = self.epoch_batches(0)
        self.steps_per_epoch = max(1, math.ceil(len(self.epoch) / cfg.gradient_accumulation_steps))
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * self.steps_per_epoch))
        self.evaluates = bool(self.eval_samples) and cfg.eval_strategy != "no"
        self.eval_every = (cfg.eval_steps or self._per_epoch(cfg.evals_per_epoch)
                           or (self.steps_per_epoch if cfg.eval_strategy == "epoch" else None)) if self.evaluates else None
        self.save_every = cfg.save_steps or self._per_epoch(cfg.saves_per_epoch)

    def _per_epoch(self, times: int | None) -> int | None:
        return max(1, self.steps_per_epoch // times) if times else None

    def epoch_batches(self, epoch: int) -> list[dict]:
        """This rank's micro-batches of ``epoch``: the epoch's batches are laid out as for one process (same
        shuffle, same packing), and rank r takes batches r, r + N, r + 2N ... of them, so one step of N ranks
        reads what one process with an N-times larger micro-batch would. The last batches of an epoch that would
        leave some rank without one (at most N - 1) are left out: every rank steps the same number of times."""
        cfg, w = self.cfg, self.world
        common = dict(micro_batch_size=cfg.micro_batch_size, sequence_len=cfg.sequence_len, pad_id=self.pad_id,
                      shuffle=not cfg.curriculum_sampling, seed=cfg.seed, epoch=epoch,
                      pad_to_sequence_len=cfg.pad_to_sequence_len)
        every = preference_batches(self.train_samples, **common) if cfg.rl else \
            batches(self.train_samples, packing=cfg.sample_packing, **common)
        if not w.distributed:
            return every
        if len(every) < w.world_size:
            raise LorafitError(f"{cfg.source}: {len(every)} micro-batches of training data for {w.world_size} "
                               "processes; every process needs at least one (lower micro_batch_size or add data)")
        return every[: len(every) // w.world_size * w.world_size][w.rank :: w.world_size]

    def setup_optimizer(self) -> None:
        self.optimizer = optimizer_from_config(self.model, self.cfg)
        if getattr(self.optimizer, "lorafit_notice", None):
            self.console.print(f"[yellow]note:[/] {self.optimizer.lorafit_notice}", highlight=False)
        self.scheduler = scheduler_from_config(self.optimizer, self.cfg, self.total_steps)
        self.scaler = loss_scaler(self.model.dtype, self.world.device)  # fp16 only: dynamic loss scaling

    def resume(self) -> None:
        ckpt = self.plan.resume_from  # checked against this config when the recipe was built
        self.state = load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler, world=self.world,
                                     loss_module=self.loss_module, scaler=self.scaler)
        s = self.state
        self.console.print(f"resumed from {display(ckpt)} (step {s.step}, epoch {s.epoch}, batch {s.batch_index})")
        if s.epoch:
            self.epoch = self.epoch_batches(s.epoch)

    def prepare_output(self) -> None:
        """Clear what the plan replaces (lorafit's own files only) and record this run in the folder."""
        for note in self.plan.notes:
            self.console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)  # one line each
        if self.world.is_main:
            prepare_output(self.plan, self.fingerprint, self.cfg.source)
        barrier(self.world)

    def print_header(self) -> None:
        cfg = self.cfg
        method = "LoRA" if cfg.is_lora else "full fine-tuning"
        if cfg.four_bit:  # QLoRA
            method = f"QLoRA ({cfg.four_bit['quant_type']} base)"
        elif cfg.load_in_8bit:
            method = "LoRA (int8 base)"
        if cfg.quantize_moe_experts:
            method = method.replace(" base)", " base and experts)")
        if cfg.rl in ("dpo", "kto"):
            ref = "the adapter as it starts" if cfg.lora_model_dir or cfg.lora_init == "pissa" \
                else "the base, adapter disabled"
            method += f" + {cfg.rl.upper()} (beta {cfg.dpo_beta}; reference: {ref})"
        elif cfg.rl == "orpo":
            method += f" + ORPO (alpha {cfg.orpo_weight})"
        self.console.print(
            f"{method} | {count_parameters(self.model)} | dtype {str(self.model.dtype).removeprefix('torch.')} "
            f"on {self.world.device.type} | "
            f"{self.total_steps} steps of {cfg.micro_batch_size}×{cfg.gradient_accumulation_steps} "
            f"({self.steps_per_epoch} per epoch)")
        self.console.print(f"runtime: {self.options.describe()} | lean kernels: {self.model.lean_kernels.summary()}")
        if self.world.distributed:
            held = ""
            if self.world.fsdp:
                local, whole = held_fraction(self.model)
                held = f"; rank 0 holds {local:,} of {whole:,} parameter elements"
                codes = held_codes(self.model)
                if codes is not None:
                    held += f" ({codes[0]:,} of {codes[1]:,} bytes of quantized codes)"
            self.console.print(f"distributed: {self.world.describe()}; a step reads {cfg.micro_batch_size}×"
                               f"{cfg.gradient_accumulation_steps} micro-batches on each of {self.world.world_size} "
                               f"ranks{held}", highlight=False, soft_wrap=True)

    # ---- the loop ---------------------------------------------------------------------------------------
    def next_micro_batches(self) -> list[dict]:
        """The next accumulation group; it never spans two epochs."""
        s, group = self.state, []
        while len(group) < self.cfg.gradient_accumulation_steps:
            if s.batch_index >= len(self.epoch):
                s.epoch, s.batch_index = s.epoch + 1, 0
                self.epoch = self.epoch_batches(s.epoch)
                if group:
                    break
                continue
            group.append(self.epoch[s.batch_index])
            s.batch_index += 1
        return group

    def step(self, group: list[dict]) -> dict:
        """One optimizer step; returns its metrics row."""
        cfg, s = self.cfg, self.state
        t0 = time.perf_counter()
        row = train_step(self.model, self.optimizer, self.scheduler, group, cfg.max_grad_norm, cfg.loss_chunk_tokens,
                         self.options, world=self.world, loss_module=self.loss_module, scaler=self.scaler)
        if not math.isfinite(row["loss"]):
            raise TrainingDiverged(
                f"loss became {row['loss']} at step {s.step + 1}; stopped without updating the weights "
                f"(last good checkpoint: {latest_checkpoint(self.out) or 'none'}). Lower learning_rate or check the data"
            )
        dt = time.perf_counter() - t0
        self.log_compiles(dt)
        s.step += 1
        s.tokens_seen += row["tokens"]
        s.elapsed_s = time.perf_counter() - self.t_start
        self.last_loss = row["loss"]
        return {"step": s.step, "epoch": round(s.epoch + s.batch_index / max(len(self.epoch), 1), 4),
                "loss": row["loss"], "lr": float(self.scheduler.get_last_lr()[0]), "grad_norm": row["grad_norm"],
                "trained_tokens": row["trained_tokens"], "tokens_per_s": row["tokens"] / dt,
                "elapsed_s": round(s.elapsed_s, 3), **row.get("metrics", {}),
                **{k: row[k] for k in ("loss_scale", "skipped") if row.get(k) is not None}}

    def compiles(self) -> tuple[int, float]:
        """Graphs compiled and seconds spent compiling since the run started."""
        (n, sec), (n0, sec0) = compile_stats(), self.compiled_at_start
        return n - n0, sec - sec0

    def log_compiles(self, step_s: float) -> None:
        n, sec = self.compiles()
        if n != self.compiles_logged:
            log.debug("step %d: %d kernel graphs compiled so far in this run (%.1f s compiling; this step %.1f s)",
                      self.state.step + 1, n, sec, step_s)
            self.compiles_logged = n

    def due(self, every: int | None) -> bool:
        return bool(every) and self.state.step % every == 0

    def evaluate(self) -> dict:
        return evaluate(self.model, self.eval_samples, self.cfg, self.pad_id, options=self.options, world=self.world,
                        loss_module=self.loss_module)

    def checkpoint(self) -> Path:
        return save_checkpoint(self.out, self.model, self.optimizer, self.scheduler, self.state,
                               self.config_dump, keep=self.cfg.save_total_limit, fingerprint=self.fingerprint,
                               world=self.world, loss_module=self.loss_module, scaler=self.scaler)

    # ---- the end ----------------------------------------------------------------------------------------
    def finish(self) -> TrainResult:
        s = self.state
        interrupted = s.step < self.total_steps
        if interrupted:
            path = self.checkpoint()
            self.console.print(f"[yellow]stopped:[/] saved {path}; continue with `lorafit train {self.cfg.source} --resume`")
        wall = time.perf_counter() - self.t_start
        n, sec = self.compiles()
        result = TrainResult(self.out, s.step, self.last_loss, wall_s=wall, interrupted=interrupted,
                             tokens_per_s=s.tokens_seen / max(wall, 1e-9), compiles=n, compile_s=sec,
                             history=self.metrics.rows(), rank=self.world.rank)
        if interrupted:
            return result
        final_eval = {}
        if self.last_eval is not None and self.last_eval[0] == s.step:
            final_eval = self.last_eval[1]  # the last step was an eval step: same weights, same numbers
        elif self.evaluates:
            final_eval = self.evaluate()
            self.metrics.write({"step": s.step, **final_eval})
        if final_eval:
            result.eval_loss = final_eval["eval_loss"]
        self.save()
        result.history = self.metrics.rows()
        result.model = self.model
        return result

    def save(self) -> None:
        """The trained adapter in PEFT format (LoRA) or the full model (full fine-tuning), atomically; the plot.
        Under torchrun rank 0 writes them (the whole adapter, gathered from FSDP2's shards), the others wait."""
        cfg = self.cfg
        lora = getattr(self.model, "lora_config", None) is not None
        state = adapter_state_dict(self.model) if lora else None  # on every rank: FSDP2 gathers the shards
        if not self.world.is_main:
            barrier(self.world)
            return
        if lora:
            save_adapter(self.model, self.out, base_model=cfg.base_model, state=state)
        else:
            with atomic_dir(self.out / "model") as tmp:
                save_pretrained(self.model, tmp)  # linearized Llama 4 experts written fused
                self.tokenizer.save_pretrained(tmp)
        kind = "QLoRA" if cfg.four_bit else "LoRA (int8 base)" if cfg.load_in_8bit else "LoRA"
        method = f"{kind} r={cfg.lora_r}" if cfg.is_lora else "full fine-tuning"
        plot_loss(self.out / "metrics.jsonl", self.out / "loss.png", title=f"{Path(cfg.base_model).name} — {method}")
        barrier(self.world)
