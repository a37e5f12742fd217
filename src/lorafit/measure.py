"""Measured peak memory of real training steps, split like the estimate, next to it.

The step is the trainer's own (:func:`lorafit.train.train_step`: forward, chunked loss, backward, gradient
clipping, optimizer and scheduler step, ``zero_grad(set_to_none=True)``), on a model prepared by
:func:`lorafit.train.make_trainable` with the settings' runtime options. On CPU the peak comes from torch's
``MemTracker`` (parameters, gradients, activations, optimizer states, temporaries); on CUDA from
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field, replace

import torch

from lorafit.memory.estimate import Estimate, Settings, estimate
from lorafit.memory.spec import ModelSpec


@dataclass
class Measured:
    peak: int
    by_kind: dict[str, int] = field(default_factory=dict)  # MemTracker categories at the peak (CPU only)
    device: str = "cpu"
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    rank: int = 0  # under torchrun, the rank this peak is of


def hf_config(spec: ModelSpec):
    """A transformers config with ``spec``'s shape (random-weight models in measurements, tests and
    benchmarks; here, not in the torch-free ``lorafit.memory``)."""
    import transformers as tf

    common = dict(vocab_size=spec.vocab, tie_word_embeddings=spec.tied_embeddings)
    if spec.family == "gpt2":
        return tf.GPT2Config(n_embd=spec.hidden, n_layer=spec.layers, n_head=spec.heads,
                             n_inner=spec.intermediate, n_positions=spec.max_positions or 1024, resid_pdrop=0.0,
                             embd_pdrop=0.0, attn_pdrop=0.0, **common)
    kw = dict(hidden_size=spec.hidden, intermediate_size=spec.intermediate, num_hidden_layers=spec.layers,
              num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim,
              **common)
    if spec.arch == "qwen2":
        return tf.Qwen2Config(**kw)
    if spec.arch == "mistral":
        return tf.MistralConfig(sliding_window=None, **kw)
    if spec.arch == "gemma":
        return tf.GemmaConfig(**kw)
    if spec.arch == "gemma2":
        return tf.Gemma2Config(final_logit_softcapping=spec.final_logit_softcap,
                               attn_logit_softcapping=spec.attn_logit_softcap, sliding_window=None, **kw)
    if spec.arch == "phi3":
        kw.pop("head_dim")
        # Phi-3's default pad id (32000) is outside a small test vocabulary
        return tf.Phi3Config(pad_token_id=32000 if spec.vocab > 32000 else None, **kw)
    return tf.LlamaConfig(**kw)


def build_model(spec: ModelSpec, s: Settings, model_name: str | None = None, seed: int = 0):
    """A random-weight model with ``spec``'s shape (or the real ``model_name``), adapter attached like the trainer."""
    import transformers

    from lorafit.models import load_model, parse_dtype, torchao_import_quiet

    torch.manual_seed(seed)
    if model_name:
        model = load_model(model_name, s.dtype)
    else:
        transformers.logging.set_verbosity_error()
        with torchao_import_quiet():  # transformers' quantizers import torchao (when installed) as a model is built
            import transformers.quantizers  # noqa: F401
        model = transformers.AutoModelForCausalLM.from_config(
            hf_config(spec), dtype=parse_dtype(s.dtype), attn_implementation="sdpa")
    if s.four_bit:
        from lorafit.models import quantize_base

        quantize_base(model, s.four_bit, s.double_quant)
    if s.eight_bit:
        from lorafit.models import quantize_base_8bit

        quantize_base_8bit(model)
    _prepare(model, s)
    return model


def _prepare(model, s: Settings) -> None:
    """The trainer's own preparation of a loaded model (adapter, lean kernels, checkpointing, no cache)."""
    from lorafit.lora.config import LoraConfig
    from lorafit.train import make_trainable

    lora = None
    if s.method == "lora":
        lora = LoraConfig(r=s.r, alpha=s.alpha, dropout=s.dropout, target_modules=s.targets,
                          layers_to_transform=s.layers_to_transform, rank_pattern=dict(s.rank_pattern),
                          use_dora=s.use_dora, modules_to_save=s.modules_to_save)
    make_trainable(model, lora, s.gradient_checkpointing, s.runtime)


def _batch(vocab: int, s: Settings, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (s.micro_batch, s.seq_len), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone(), "num_trained_tokens": s.micro_batch * (s.seq_len - 1)}
    if s.packing:  # two documents per row: positions restart half-way
        half = s.seq_len // 2
        pos = torch.cat([torch.arange(half), torch.arange(s.seq_len - half)]).expand(s.micro_batch, -1)
        batch["position_ids"] = pos.contiguous()
        batch["seq_ids"] = (torch.arange(s.seq_len) >= half).long().expand(s.micro_batch, -1).contiguous()
    else:
        batch["attention_mask"] = torch.ones_like(ids)
    return batch


def _preference_batch(vocab: int, s: Settings, seed: int) -> dict:
    """A preference micro-batch of random tokens through the trainer's own collation: each sequence a prompt of
    8 tokens and an answer filling the rest, the case the estimate counts (DPO/ORPO: ``micro_batch`` sequences,
    half of them chosen; KTO: ``micro_batch`` rows, half desirable, and as many KL rows)."""
    from lorafit.data.preference import KTOSample, PairSample, kto_batches, pair_batches

    g = torch.Generator().manual_seed(seed)
    prompt = min(8, s.seq_len // 2)

    def ids(n: int) -> list[int]:
        return torch.randint(1, vocab, (n,), generator=g).tolist()

    common = dict(sequence_len=s.seq_len, pad_id=0, shuffle=False, seed=0, epoch=0)
    if s.rl == "kto":
        rows = [KTOSample(ids(prompt), ids(s.seq_len - prompt), i % 2 == 0) for i in range(s.micro_batch)]
        return kto_batches(rows, micro_batch_size=s.micro_batch, **common)[0]
    pairs = [PairSample(ids(prompt), ids(s.seq_len - prompt), ids(s.seq_len - prompt), "")
             for _ in range(s.micro_batch // 2)]
    return pair_batches(pairs, micro_batch_size=len(pairs), **common)[0]


def _step_fn(model, s: Settings, world=None, loss_module=None):
    """One optimizer step with the trainer's code (or a plain HF-loss step for peer comparison). Under torchrun,
    ``world`` and ``loss_module`` (DDP / FSDP2 around the model, :func:`lorafit.train.distributed.wrap`)."""
    from lorafit.train import train_step
    from lorafit.train.optim import build_optimizer, build_scheduler
    from lorafit.train.step import loss_scaler

    optimizer = build_optimizer(model, s.optimizer, lr=1e-4)
    scheduler = build_scheduler(optimizer, "constant", 0, 100)  # no warmup, 100 steps
    scaler = loss_scaler(model.dtype, next(model.parameters()).device)  # fp16, as the trainer steps it

    def step(batch):
        if s.loss == "hf":
            from lorafit.data import model_inputs

            out = model(**model_inputs(batch), labels=batch["labels"])
            out.loss.backward()
            loss = float(out.loss.detach())
            del out
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss
        return train_step(model, optimizer, scheduler, [batch], 1.0, s.loss_chunk_tokens, world=world,
                          loss_module=loss_module, scaler=scaler)["loss"]

    return step, optimizer


def measure(spec: ModelSpec, s: Settings, steps: int = 3, model_name: str | None = None,
            device: str | None = None) -> Measured:
    """Run ``steps`` training steps and return the peak tensor memory (bytes) over all of them.

    Under torchrun (``s.nproc`` > 1, the launch's world size) every rank builds the same model, wraps it as the
    trainer does (DDP, or FSDP2 when ``s.fsdp``), takes its own batches and measures its own peak: this rank's.
    """
    from lorafit.train.distributed import init_world, wrap

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    world = init_world(fsdp=s.fsdp) if s.nproc > 1 else None
    if world is not None and world.world_size != s.nproc:
        from lorafit.errors import LorafitError

        raise LorafitError(f"measure: the settings say {s.nproc} processes, torchrun started {world.world_size}")
    model = build_model(spec, s, model_name)  # the same seed on every rank: equal parameters, as FSDP2 needs
    vocab = model.get_input_embeddings().weight.shape[0]
    if device == "cuda":
        model.to(world.device if world else "cuda")
    if s.rl:  # the preference loss the trainer runs (its reference: the model with the adapter switched off)
        from lorafit.train.preference import PreferenceLoss

        def objective(m):
            return PreferenceLoss(m, s.rl, 0.1)

        loss_module = wrap(model, world, objective=objective) if world is not None else objective(model)
    else:
        loss_module = wrap(model, world) if world is not None else None
    step, optimizer = _step_fn(model, s, world, loss_module)
    rank, size = (world.rank, world.world_size) if world else (0, 1)
    make = _preference_batch if s.rl else _batch
    batches = [make(vocab, s, i * size + rank) for i in range(steps)]  # each rank its own batches
    losses = []
    if device == "cuda":
        batches = [{k: v.cuda() if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for b in batches:
            losses.append(step(b))
        torch.cuda.synchronize()
        result = Measured(torch.cuda.max_memory_allocated(world.device if world else None), {}, "cuda", steps,
                          losses)
    else:
        from lorafit._compat import mem_tracker, skip_frozen_grad_hooks

        # One tracker per step, the peak is the largest of the steps'. A tracker kept over several steps holds
        # each step's leaf tensors that require grad (with checkpointing, HF makes the embedding output one) and
        # their ``.grad`` alive into the following steps: 2 × tokens × hidden × dtype per past step that training
        # without a tracker never allocates.
        dev: dict = {}
        tracked = loss_module if loss_module is not None else model
        for b in batches:
            mt = mem_tracker()
            skip_frozen_grad_hooks(mt, tracked)  # frozen parameters (a LoRA base) cannot take a gradient hook
            mt.track_external(tracked, optimizer)  # parameters and the optimizer states made by earlier steps
            with mt:
                losses.append(step(b))
            snap = mt.get_tracker_snapshot("peak")
            cur = next(iter(snap.values())) if snap else {}
            if cur.get("Total", 0) >= dev.get("Total", 0):
                dev = cur
            del mt
            gc.collect()
        by_kind = {str(getattr(k, "value", k)): int(v) for k, v in dev.items()}
        result = Measured(int(by_kind.get("Total", 0)), by_kind, "cpu", steps, losses)
    result.rank = rank
    del model, optimizer, step, loss_module
    gc.collect()
    return result


def every_rank(m: Measured) -> list[Measured]:
    """Each rank's measurement, in rank order, on every rank (under torchrun; else ``[m]``). Ends the process
    group: call it once, after :func:`measure`."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [m]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, m)
    dist.destroy_process_group()
    return out


def compare(spec: ModelSpec, s: Settings, steps: int = 3, model_name: str | None = None) -> tuple[Estimate, Measured, float]:
    """Estimate (tensor memory only, no framework overhead) vs measured peak; error in % of the measured."""
    m = measure(spec, s, steps, model_name)
    est = estimate(spec, replace(s, device="cpu"))
    err = 100.0 * (est.allocated_peak - m.peak) / m.peak
    return est, m, err
