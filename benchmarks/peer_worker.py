"""One benchmark run in its own process: one implementation, one configuration (driven by ``peer.py``).

Implementations:

* ``lorafit``      — what ``lorafit train`` runs: :class:`lorafit.train.recipe.Recipe` built from a YAML config
                     (``write_config``), data pipeline, masks, clipping, metrics log and progress included.
* ``lorafit-step`` — ``make_trainable`` + ``lorafit.train.train_step`` in a bare loop (the benchmark's lorafit side
                     before it timed the recipe; kept to show what the recipe's machinery costs).
* ``peft-loop``    — ``peft.get_peft_model`` in a plain loop: ``model(**batch, labels=...).loss.backward()``,
                     gradient clipping, ``AdamW.step()``.
* ``peft-trainer`` — the same PEFT model under ``transformers.Trainer`` (what most users run).

Adapters (``spec["adapter"]``): ``lora``; ``qlora`` (the base's linear layers NF4 with double quantization:
lorafit ``adapter: qlora`` + ``load_in_4bit``, PEFT over ``transformers`` + ``BitsAndBytesConfig`` with
``device_map={"": "cpu"}`` on CPU); ``dora`` (``peft_use_dora`` / PEFT's ``use_dora=True``).

Every side loads the same random-weight model from the same HF folder and trains on the same token batches:
the ones lorafit's data pipeline makes from the same completion-format JSONL (``pipeline_batches``: the
recipe's own tokenisation, truncation, masks and batch order), so every trained token is the same on all
sides. All start from the same adapter (A drawn per module from a generator seeded by the module's name, B
zero: see :func:`init_adapter`) and use the same optimizer settings (AdamW lr 1e-4, betas 0.9/0.999, eps 1e-8,
no weight decay, constant schedule, gradient clipping at 1.0). Each uses the AdamW implementation it picks by
itself: lorafit and the Trainer torch's fused kernel, the plain loop ``torch.optim.AdamW(params)`` as written.
Steps: ``warmup`` untimed, ``steps`` timed, then (optionally) one more step under ``MemTracker`` for the
memory breakdown, so the tracker never slows the timed steps. For ``lorafit`` a step's time is one turn of the
recipe's loop (from one ``next_micro_batches`` call to the next). With ``adapter_out`` in the spec (the
exactness check), the adapter before the first step and after the last timed one is written there
(safetensors, keys ``<module>.A`` / ``<module>.B`` and ``….init``) for ``peer.py`` to compare. ``lr_scale``
(lorafit only) scales the learning rate: a wrong update the exactness check must catch. Prints one line
``PEER_RESULT <json>``.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

RESULT_TAG = "PEER_RESULT "
SHAPES = {"smollm2-135m": "smollm2-135m", "llama-3.2-1b": "llama-3.2-1b"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# --- process memory -----------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_rss_peak() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) of this process (Linux: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --- model, adapter, data -----------------------------------------------------------------------------
def build_base(spec: dict):
    import transformers

    from lorafit.measure import hf_config
    from lorafit.memory.catalog import get_model

    transformers.logging.set_verbosity_error()
    cfg = hf_config(get_model(spec["shape"]))
    if spec.get("layers"):
        cfg.num_hidden_layers = spec["layers"]
    cfg.use_cache = False
    torch.manual_seed(spec["seed"])
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[spec["dtype"]], attn_implementation="sdpa")
    return model


def init_adapter(pairs) -> None:
    """Same starting adapter on every side: A ~ U(±1/√in) (kaiming-uniform, a=√5) from a per-module seed, B = 0.

    ``pairs``: (module path relative to the causal LM, A weight, B weight).
    """
    with torch.no_grad():
        for name, a, b in pairs:
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            bound = 1.0 / math.sqrt(a.shape[1])
            a.copy_(torch.empty(a.shape).uniform_(-bound, bound, generator=g))
            b.zero_()


WORDS_PER_ROW = 400  # random words: ~900 tokens, every row is cut to sequence_len (all batches full length)


def write_workspace(folder, spec: dict, rows: int) -> dict:
    """The files every side reads: the random-weight model of ``spec``'s shape saved as an HF folder (with the
    demo model's tokenizer: the SmolLM2 vocabulary) and a completion-format JSONL of ``rows`` random-word texts,
    each longer than ``spec["seq"]`` tokens. Returns ``{"base": folder, "data": file}``. ``spec["tokenizer"]``: a
    folder with that tokenizer's files instead of the demo package's."""
    import random

    from lorafit.models import load_tokenizer

    folder = Path(folder)
    base, data = folder / "base", folder / "data.jsonl"
    model = build_base({**spec, "dtype": "float32"})
    model.save_pretrained(base)
    load_tokenizer(spec.get("tokenizer") or "demo", what="base_model").save_pretrained(base)
    del model
    rng = random.Random(spec["seed"])
    letters = "abcdefghijklmnopqrstuvwxyz"
    with open(data, "w") as f:
        for _ in range(rows):
            text = " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 9)))
                            for _ in range(WORDS_PER_ROW))
            f.write(json.dumps({"text": text}) + "\n")
    return {"base": str(base), "data": str(data)}


def write_config(spec: dict, folder) -> Path:
    """The YAML a user would write for this run (``lorafit train config.yaml``), in ``folder``."""

    import yaml

    ws = spec["workspace"]
    adapter = spec.get("adapter", "lora")
    cfg = {
        "base_model": ws["base"], "adapter": "qlora" if adapter == "qlora" else "lora",
        **({"load_in_4bit": True} if adapter == "qlora" else {}),
        **({"peft_use_dora": True} if adapter == "dora" else {}),
        "lora_r": spec["r"], "lora_alpha": spec["alpha"], "lora_dropout": spec["dropout"],
        "lora_target_linear": True,
        "datasets": [{"path": ws["data"], "type": "completion"}],
        "sequence_len": spec["seq"], "micro_batch_size": spec["batch"], "gradient_accumulation_steps": 1,
        # the run a user plans (compile_kernels: auto decides from it); the worker stops after its own steps
        "max_steps": spec["planned_steps"],
        "learning_rate": 1e-4 * spec.get("lr_scale", 1.0), "lr_scheduler": "constant", "warmup_steps": 0,
        "optimizer": "adamw_torch", "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999,
        "adam_epsilon": 1e-8, "max_grad_norm": 1.0, "gradient_checkpointing": spec["gc"],
        "bf16": spec["dtype"] == "bfloat16", "logging_steps": 1, "seed": spec["seed"],
        "output_dir": str(Path(folder) / "out"),
        **({"compile_kernels": spec["compile_kernels"]} if spec.get("compile_kernels") is not None else {}),
    }
    path = Path(folder) / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def pipeline_batches(spec: dict, n: int) -> list[dict]:
    """The first ``n`` micro-batches ``lorafit train`` makes of the run's config (its tokenizer, data
    pipeline, masks and order): what every side trains on."""
    from rich.console import Console

    from lorafit.config import load_config
    from lorafit.models import load_tokenizer
    from lorafit.train.distributed import shutdown
    from lorafit.train.recipe import Recipe

    with tempfile.TemporaryDirectory(prefix="peer-cfg-") as tmp:
        cfg = load_config(write_config(spec, tmp))
        recipe = Recipe(cfg, Console(quiet=True))
        try:
            recipe.tokenizer = load_tokenizer(cfg.base_model, cfg.config_dir, "base_model")
            if recipe.tokenizer.pad_token is None:
                recipe.tokenizer.pad_token = recipe.tokenizer.eos_token
            recipe.setup_data()
        finally:
            shutdown(recipe.world)
    out = recipe.epoch[:n]
    check_batches(spec, out, n)
    return out


def check_batches(spec: dict, batches: list[dict], n: int) -> None:
    """The benchmark's shape: ``n`` batches of batch × seq tokens, every token but each row's first trained."""
    full = spec["batch"] * (spec["seq"] - 1)
    if len(batches) < n or any(tuple(b["input_ids"].shape) != (spec["batch"], spec["seq"])
                               or b["num_trained_tokens"] != full for b in batches[:n]):
        raise SystemExit(f"data pipeline gave {len(batches)} batches, not {n} full ones of {spec['batch']} × "
                         f"{spec['seq']}: {[tuple(b['input_ids'].shape) for b in batches[:n]]}")


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """The adapter as fp32 copies, ``{"<module>.A": A, "<module>.B": B}`` with module paths relative to the causal
    LM (the same on both sides: lorafit's ``named_lora_layers`` and PEFT's names less ``base_model.model.``)."""
    from lorafit.lora import LoraLinear

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLinear):
            a, b = m.lora_A, m.lora_B
        elif hasattr(m, "lora_A") and hasattr(m.lora_A, "keys") and "default" in m.lora_A.keys():  # PEFT
            a, b = m.lora_A["default"], m.lora_B["default"]
        else:
            continue
        name = name.removeprefix("base_model.model.")
        out[f"{name}.A"] = a.weight.detach().float().cpu().clone()
        out[f"{name}.B"] = b.weight.detach().float().cpu().clone()
    return out


def save_adapter_pair(path: str, init: dict, final: dict) -> None:
    from safetensors.torch import save_file

    save_file({**final, **{f"{k}.init": v for k, v in init.items()}}, path)


def lorafit_layers(model) -> list:
    """(module path, A weight, B weight) of a lorafit model, for :func:`init_adapter`."""
    from lorafit.lora import named_lora_layers

    return [(n, m.lora_A.weight, m.lora_B.weight) for n, m in named_lora_layers(model)]


def load_peft_base(spec: dict):
    """The saved base as a PEFT user loads it: ``from_pretrained`` in the run's dtype; for ``qlora`` through
    ``BitsAndBytesConfig`` (NF4, double quantization, compute in the run's dtype) on the CPU."""
    import transformers

    transformers.logging.set_verbosity_error()
    dtype = DTYPES[spec["dtype"]]
    kw = {}
    if spec.get("adapter") == "qlora":
        kw["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        kw["device_map"] = {"": spec["device"]}
    return transformers.AutoModelForCausalLM.from_pretrained(spec["workspace"]["base"], dtype=dtype,
                                                             attn_implementation="sdpa", **kw)


def prepare_peft(spec: dict):
    import peft

    model = load_peft_base(spec)
    if spec["gc"] and spec["impl"] == "peft-loop":  # the Trainer enables it itself
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    cfg = peft.LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
                          target_modules="all-linear", task_type="CAUSAL_LM",
                          use_dora=spec.get("adapter") == "dora")
    model = peft.get_peft_model(model, cfg)  # autocast_adapter_dtype=True: fp32 adapters on a bf16 base
    prefix = "base_model.model."
    init_adapter([(n[len(prefix):], m.lora_A["default"].weight, m.lora_B["default"].weight)
                  for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)])
    return model


# --- the measured step's memory -----------------------------------------------------------------------
class Tracker:
    """MemTracker around one step; frozen parameters cannot take gradient hooks, so they are marked done."""

    def __init__(self, model, optimizer):
        from lorafit._compat import mem_tracker, skip_frozen_grad_hooks

        self.mt = mem_tracker()
        skip_frozen_grad_hooks(self.mt, model)
        self.mt.track_external(model, optimizer)

    def __enter__(self):
        self.mt.__enter__()
        return self

    def __exit__(self, *exc):
        self.mt.__exit__(*exc)

    def result(self) -> dict:
        snap = self.mt.get_tracker_snapshot("peak")
        dev = next(iter(snap.values())) if snap else {}
        by_kind = {str(getattr(k, "value", k)): int(v) for k, v in dev.items()}
        out = {"peak": by_kind.get("Total", 0), "by_kind": by_kind}
        # Activations saved by one decoder block (the first), and what the block adds at its forward peak.
        for stats in self.mt.memory_tracking.values():
            if stats.mod_fqn.endswith("layers.0"):
                snaps = {str(getattr(k, "value", k)): v for k, v in stats.snapshots.items()}

                pre, post = _kind_at(snaps, "Pre-Forward"), _kind_at(snaps, "Post-Forward")
                if pre is not None and post is not None:
                    out["block0_saved_activations"] = post - pre
                break
        return out


def _kind_at(snaps: dict, state: str, kind: str = "Activation") -> int | None:
    s = snaps.get(state)
    return int(next(iter(s[0].values())).get(kind, 0)) if s else None


# --- the three implementations ------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Recorder:
    """Per-step wall times and losses; RSS high-water over the timed steps; the memory step."""

    def __init__(self, spec, device):
        self.spec, self.device = spec, device
        self.times, self.cpu_times, self.losses = [], [], []  # wall and process CPU seconds per timed step
        self.rss = {}
        self.memory = None
        self.tmp = tempfile.mkdtemp(prefix="peer-run-")  # the run's config and output folder (removed by main)

    def before_timed(self):
        self.rss["before_timed_kib"] = _status_kib("VmRSS")
        self.rss["hwm_reset"] = reset_rss_peak()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def after_timed(self):
        self.rss["timed_hwm_kib"] = _status_kib("VmHWM")
        if self.device.type == "cuda":
            self.cuda_peak = torch.cuda.max_memory_allocated()
            self.cuda_reserved = torch.cuda.max_memory_reserved()


def run_lorafit_step(spec, device, rec: Recorder):
    """The recipe's model, optimizer and schedule from the same config, stepped by ``train_step`` in a bare
    loop (no data pipeline, metrics or progress around it)."""
    from lorafit.config import load_config
    from lorafit.train import train_step
    from lorafit.train.optim import optimizer_from_config, scheduler_from_config
    from lorafit.train.setup import prepare_model, seed_everything

    cfg = load_config(write_config(spec, rec.tmp))
    options = cfg.runtime_options()
    seed_everything(cfg.seed)
    model, _ = prepare_model(cfg, options)
    model.to(device).train()
    init_adapter(lorafit_layers(model))
    opt = optimizer_from_config(model, cfg)
    sched = scheduler_from_config(opt, cfg, cfg.max_steps)
    return model, opt, lambda b: train_step(model, opt, sched, [b], cfg.max_grad_norm, cfg.loss_chunk_tokens,
                                            options)["loss"]


def run_lorafit(spec, device, rec: Recorder):
    """``lorafit train`` itself: the recipe of the run's YAML, stopped after the benchmark's steps. A step's time
    is one turn of the recipe's loop (data, step, clipping, metrics row, progress); the adapter is set to the
    shared start right after the recipe attaches it."""
    from rich.console import Console

    from lorafit.config import load_config
    from lorafit.train.distributed import shutdown
    from lorafit.train.recipe import Recipe

    n_timed_end = spec["warmup"] + spec["steps"]
    memory = spec["memory"] and device.type == "cpu"
    stamps: list[float] = []
    state = {"init": None}

    def loop_turn():  # the start of a turn of the recipe's loop (and of finish, after the last)
        _sync(device)
        stamps.append((time.perf_counter(), time.process_time()))
        i = len(stamps) - 1  # steps done so far
        if i == spec["warmup"]:
            rec.before_timed()
        if spec["warmup"] < i <= n_timed_end:
            rec.times.append(stamps[i][0] - stamps[i - 1][0])
            rec.cpu_times.append(stamps[i][1] - stamps[i - 1][1])
        if i == n_timed_end:
            rec.after_timed()
            if state["init"] is not None:  # before the memory / profile steps, which train further
                save_adapter_pair(spec["adapter_out"], state["init"], adapter_tensors(recipe.model))

    class TimedRecipe(Recipe):
        def setup_model(self):
            super().setup_model()
            init_adapter(lorafit_layers(self.model))
            if spec.get("adapter_out"):
                state["init"] = adapter_tensors(self.model)

        def setup_data(self):
            super().setup_data()
            check_batches(spec, self.epoch, min(len(self.epoch), n_total))

        def next_micro_batches(self):
            loop_turn()
            return super().next_micro_batches()

        def step(self, group):
            i = self.state.step
            if memory and i == n_timed_end:
                tr = Tracker(self.model, self.optimizer)
                with tr:
                    row = super().step(group)
                rec.memory = tr.result()
            elif spec["profile"] and i == n_total - 1:
                out = {}
                rec.profile = profile_step(lambda: out.setdefault("row", super(TimedRecipe, self).step(group)))
                row = out["row"]
            else:
                row = super().step(group)
            if i < n_timed_end:  # as in the loops: the losses of the warm-up and timed steps
                rec.losses.append(row["loss"])
            return row

        def finish(self):
            if len(stamps) == self.state.step:  # the last step's turn ends here
                loop_turn()
            return super().finish()

    n_total = n_timed_end + (1 if memory else 0) + (1 if spec["profile"] else 0)
    cfg = load_config(write_config(spec, rec.tmp))
    recipe = TimedRecipe(cfg, Console(width=160))
    try:
        recipe.run(stop_after=n_total)
    finally:
        shutdown(recipe.world)
    rec.options = recipe.options
    return recipe.model


def run_peft_loop(spec, device, rec: Recorder):
    model = prepare_peft(spec).to(device)
    model.train()
    params = trainable(model)
    opt = adamw(params)

    def step(b):
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        out.loss.backward()
        loss = float(out.loss.detach())
        del out
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return model, opt, step


def loop(spec, device, rec: Recorder, impl_fn):
    model, opt, step = impl_fn(spec, device, rec)
    init = adapter_tensors(model) if spec.get("adapter_out") else None
    n_total = spec["warmup"] + spec["steps"] + (1 if spec["memory"] else 0) + (1 if spec["profile"] else 0)
    batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
               for b in pipeline_batches(spec, n_total)]
    i = 0
    for _ in range(spec["warmup"]):
        rec.losses.append(step(batches[i]))
        i += 1
    rec.before_timed()
    for _ in range(spec["steps"]):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        rec.losses.append(step(batches[i]))
        _sync(device)
        rec.times.append(time.perf_counter() - t0)
        rec.cpu_times.append(time.process_time() - c0)
        i += 1
    rec.after_timed()
    if init is not None:  # before the memory / profile steps, which train further
        save_adapter_pair(spec["adapter_out"], init, adapter_tensors(model))
    if spec["profile"]:
        rec.profile = profile_step(lambda: step(batches[n_total - 1 - (1 if spec["memory"] else 0)]))
    if spec["memory"] and device.type == "cpu":
        tr = Tracker(model, opt)
        with tr:
            step(batches[i])
        rec.memory = tr.result()
    return model


def run_peft_trainer(spec, device, rec: Recorder):
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    model = prepare_peft(spec)
    n_timed_end = spec["warmup"] + spec["steps"]
    n_total = n_timed_end + (1 if spec["memory"] and device.type == "cpu" else 0)
    rows = [{k: v[j] for k, v in b.items() if k != "num_trained_tokens"}
            for b in pipeline_batches(spec, n_total) for j in range(spec["batch"])]

    class Timing(TrainerCallback):
        def __init__(self):
            self.t0 = None
            self.tracker = None

        def on_step_begin(self, args, state, control, **kw):
            step = state.global_step
            if step == spec["warmup"]:
                rec.before_timed()
            if step == n_timed_end:
                if spec["memory"] and device.type == "cpu":
                    opt = kw["optimizer"]
                    self.tracker = Tracker(kw["model"], getattr(opt, "optimizer", opt))
                    self.tracker.__enter__()
            _sync(device)
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            _sync(device)
            dt, cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
            step = state.global_step - 1
            if spec["warmup"] <= step < n_timed_end:
                rec.times.append(dt)
                rec.cpu_times.append(cpu)
            if step == n_timed_end - 1:
                rec.after_timed()
            if self.tracker is not None:
                self.tracker.__exit__(None, None, None)
                rec.memory = self.tracker.result()
                self.tracker = None

    class RecordingTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            rec.losses.append(float(loss))
            return loss

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=spec["batch"], max_steps=n_total, learning_rate=1e-4,
            weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
            lr_scheduler_type="constant", warmup_steps=0,  # optim: the Trainer's default (fused AdamW)
            bf16=spec["dtype"] == "bfloat16", gradient_checkpointing=spec["gc"],
            gradient_checkpointing_kwargs={"use_reentrant": False}, report_to=[], save_strategy="no",
            logging_strategy="no", use_cpu=device.type == "cpu", dataloader_num_workers=0,
            train_sampling_strategy="sequential", seed=spec["seed"], disable_tqdm=True,
        )
        trainer = RecordingTrainer(model=model, args=args, train_dataset=rows, data_collator=default_data_collator,
                                   callbacks=[Timing()])
        trainer.train()
    return model


# --- profiling ----------------------------------------------------------------------------------------
def profile_step(fn, top: int = 30) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    rows = []
    for e in sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]:
        rows.append({"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3,
                     "total_ms": e.cpu_time_total / 1e3})
    return {"wall_s": wall, "top_self": rows,
            "table": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)}


# --- floor ----------------------------------------------------------------------------------------------
def matmul_peak_gflops(dtype, device, n_tokens: int, hidden: int, inter: int) -> float:
    """Best of a few (tokens × hidden) @ (hidden × inter) matmuls: the step's typical GEMM shape."""
    a = torch.randn(n_tokens, hidden, dtype=dtype, device=device)
    b = torch.randn(hidden, inter, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(6):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(3):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / 3)
    return 2 * n_tokens * hidden * inter / best / 1e9


def step_flops(model_cfg, n_tokens: int, seq: int, gc: bool) -> float:
    """Matmul FLOPs of one LoRA step: frozen linears forward + input-gradient, head twice, attention; LoRA ~0."""
    d, f, L, V = model_cfg.hidden_size, model_cfg.intermediate_size, model_cfg.num_hidden_layers, model_cfg.vocab_size
    hd = getattr(model_cfg, "head_dim", None) or d // model_cfg.num_attention_heads
    q, kv = model_cfg.num_attention_heads * hd, model_cfg.num_key_value_heads * hd
    per_tok = L * (d * (q + 2 * kv) + q * d + 3 * d * f)  # MACs per token of the block linears
    attn = L * 2 * seq * q  # QKᵀ and AV MACs per token (full, not causal-halved)
    fwd = 2 * n_tokens * (per_tok + attn)
    head = 2 * n_tokens * d * V
    body_passes = 3 if gc else 2  # forward, input-gradient (and recomputation)
    attn_bwd_extra = 2 * n_tokens * attn  # attention backward needs dQ, dK, dV: 2× its forward
    return body_passes * fwd + attn_bwd_extra + 2 * head


# --- main -----------------------------------------------------------------------------------------------
def main(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    rec = Recorder(spec, device)
    t_start = time.perf_counter()
    impl = spec["impl"]
    try:
        if impl == "lorafit":
            model = run_lorafit(spec, device, rec)
        elif impl == "lorafit-step":
            model = loop(spec, device, rec, run_lorafit_step)
        elif impl == "peft-loop":
            model = loop(spec, device, rec, run_peft_loop)
        elif impl == "peft-trainer":
            model = run_peft_trainer(spec, device, rec)
        else:
            raise SystemExit(f"unknown impl {impl!r}")
    finally:
        shutil.rmtree(rec.tmp, ignore_errors=True)
    tokens = spec["batch"] * spec["seq"]
    res = {
        "impl": impl, "spec": spec,
        "step_s": rec.times, "tokens_per_s": tokens * len(rec.times) / sum(rec.times) if rec.times else None,
        # CPU seconds of the whole process per step: on a shared machine less disturbed by other work than wall time
        "step_cpu_s": rec.cpu_times,
        "tokens_per_cpu_s": tokens * len(rec.cpu_times) / sum(rec.cpu_times) if rec.cpu_times else None,
        "losses": rec.losses, "rss": rec.rss,
        "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "memory": rec.memory, "wall_s": time.perf_counter() - t_start,
    }
    if device.type == "cuda":
        res["cuda_max_allocated"] = rec.cuda_peak
        res["cuda_max_reserved"] = rec.cuda_reserved
    if getattr(rec, "profile", None):
        res["profile"] = rec.profile
    handle = getattr(model, "lean_kernels", None)
    if handle is not None:  # lorafit: the runtime options its kernels ran with, and which lean paths were on
        res["lean_kernels"] = {"options": handle.options.to_dict(), "describe": handle.options.describe(),
                               "applied": dict(handle.applied)}
    if spec.get("floor"):
        cfg = model.config
        dtype = DTYPES[spec["dtype"]]
        peak = matmul_peak_gflops(dtype, device, tokens, cfg.hidden_size, cfg.intermediate_size)
        flops = step_flops(cfg, tokens, spec["seq"], spec["gc"])
        res["floor"] = {"step_tflop": flops / 1e12, "matmul_gflops": peak,
                        "floor_step_s": flops / (peak * 1e9), "floor_tokens_per_s": tokens * peak * 1e9 / flops}
    return res


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    result = main(json.loads(sys.argv[1]))
    print(RESULT_TAG + json.dumps(result), flush=True)
