"""One benchmark run in its own process: one implementation, one configuration (driven by ``peer.py``).

Implementations:

* ``lorafit``      — ``make_trainable`` + ``lorafit.train.train_step`` (chunked loss, lean LoRA autograd).
* ``peft-loop``    — ``peft.get_peft_model`` in a plain loop: ``model(**batch, labels=...).loss.backward()``,
                     gradient clipping, ``AdamW.step()``.
* ``peft-trainer`` — the same PEFT model under ``transformers.Trainer`` (what most users run).

All three build the same random-weight model (same seed), start from the same adapter (A drawn per module
from a generator seeded by the module's name, B zero: see :func:`init_adapter`), see the same batches in
the same order and use the same optimizer settings (AdamW lr 1e-4, betas 0.9/0.999, eps 1e-8, no weight
decay, constant schedule, gradient clipping at 1.0). Each uses the AdamW implementation it picks by itself:
lorafit and the Trainer torch's fused kernel, the plain loop ``torch.optim.AdamW(params)`` as written.
Steps: ``warmup`` untimed, ``steps`` timed, then (optionally) one more step under ``MemTracker`` for the
memory breakdown, so the tracker never slows the timed steps. With ``adapter_out`` in the spec (the exactness
check), the adapter before the first step and after the last timed one is written there (safetensors, keys
``<module>.A`` / ``<module>.B`` and ``….init``) for ``peer.py`` to compare. ``lr_scale`` (lorafit only) scales
the learning rate: a wrong update the exactness check must catch. Prints one line ``PEER_RESULT <json>``.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import tempfile
import time
import zlib

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


def make_batches(spec: dict, vocab: int, n: int, device) -> list[dict]:
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (spec["batch"], spec["seq"]), generator=g)
        out.append({"input_ids": ids.to(device), "labels": ids.clone().to(device),
                    "attention_mask": torch.ones_like(ids).to(device),
                    "num_trained_tokens": int(spec["batch"] * (spec["seq"] - 1))})
    return out


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


def prepare_lorafit(spec: dict):
    """What ``lorafit train`` does to a loaded model (adapter, lean gated MLPs, checkpointing, no cache)."""
    from lorafit.lora import LoraConfig, named_lora_layers
    from lorafit.options import RuntimeOptions
    from lorafit.train import make_trainable

    model = build_base(spec)
    lora = LoraConfig(r=spec["r"], alpha=spec["alpha"], dropout=spec["dropout"], target_modules="all-linear")
    make_trainable(model, lora, spec["gc"], RuntimeOptions.resolve())
    init_adapter([(n, m.lora_A.weight, m.lora_B.weight) for n, m in named_lora_layers(model)])
    return model


def prepare_peft(spec: dict):
    import peft

    model = build_base(spec)
    if spec["gc"] and spec["impl"] == "peft-loop":  # the Trainer enables it itself
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    cfg = peft.LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
                          target_modules="all-linear", task_type="CAUSAL_LM")
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
        self.times, self.losses = [], []
        self.rss = {}
        self.memory = None

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


def run_lorafit(spec, device, rec: Recorder):
    from lorafit.train import train_step
    from lorafit.train.optim import build_optimizer

    model = prepare_lorafit(spec).to(device)
    model.train()
    # lorafit train's own optimizer (torch's fused AdamW), with the shared settings
    opt = build_optimizer(model, "adamw_torch", lr=1e-4 * spec.get("lr_scale", 1.0), weight_decay=0.0,
                          betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    options = model.lean_kernels.options
    return model, opt, lambda b: train_step(model, opt, sched, [b], 1.0, options=options)["loss"]


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
    batches = make_batches(spec, model.config.vocab_size, n_total, device)
    i = 0
    for _ in range(spec["warmup"]):
        rec.losses.append(step(batches[i]))
        i += 1
    rec.before_timed()
    for _ in range(spec["steps"]):
        _sync(device)
        t0 = time.perf_counter()
        rec.losses.append(step(batches[i]))
        _sync(device)
        rec.times.append(time.perf_counter() - t0)
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
            for b in make_batches(spec, model.config.vocab_size, n_total, torch.device("cpu"))
            for j in range(spec["batch"])]

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
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync(device)
            dt = time.perf_counter() - self.t0
            step = state.global_step - 1
            if spec["warmup"] <= step < n_timed_end:
                rec.times.append(dt)
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
    if impl == "lorafit":
        model = loop(spec, device, rec, run_lorafit)
    elif impl == "peft-loop":
        model = loop(spec, device, rec, run_peft_loop)
    elif impl == "peft-trainer":
        model = run_peft_trainer(spec, device, rec)
    else:
        raise SystemExit(f"unknown impl {impl!r}")
    tokens = spec["batch"] * spec["seq"]
    res = {
        "impl": impl, "spec": spec,
        "step_s": rec.times, "tokens_per_s": tokens * len(rec.times) / sum(rec.times) if rec.times else None,
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
