"""Optimizer and learning-rate schedule from the config (axolotl's names)."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from lorafit.config import OPTIMIZERS
from lorafit.errors import LorafitError


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay weight matrices (LoRA A/B included); never biases or norm scales — the usual split."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "norm" not in name else no_decay).append(p)
    if not decay and not no_decay:
        raise LorafitError("the model has no trainable parameters (check adapter / lora_target_modules)")
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def loraplus_groups(model: nn.Module, lr: float, ratio: float, embedding_lr: float | None) -> list[dict]:
    """LoRA+ (Hayou et al. 2024) as axolotl runs it, through PEFT's ``create_loraplus_optimizer`` and its rules:
    LoRA on embeddings at ``embedding_lr`` (default 1e-6); every ``lora_B`` and every 1-D parameter at
    ``lr × ratio``; the rest (``lora_A``, modules to save) at ``lr``. No weight decay in any group: PEFT's default
    ``loraplus_weight_decay``, which axolotl does not set."""
    from lorafit.lora.embedding import LoraEmbedding

    embeddings = {id(p) for m in model.modules() if isinstance(m, LoraEmbedding)
                  for n, p in m.named_parameters(recurse=False) if n.startswith("lora_embedding_")}
    a, b, emb = [], [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (emb if id(p) in embeddings else b if "lora_B" in name or p.ndim == 1 else a).append(p)
    groups = [{"params": a, "lr": lr}, {"params": emb, "lr": 1e-6 if embedding_lr is None else embedding_lr},
              {"params": b, "lr": lr * ratio}]
    return [{**g, "weight_decay": 0.0} for g in groups if g["params"]]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                    loraplus: tuple[float, float | None] | None = None) -> torch.optim.Optimizer:
    """The optimizer an axolotl optimizer ``name`` stands for (``lorafit.config.OPTIMIZERS``); ``loraplus``:
    ``(loraplus_lr_ratio, loraplus_lr_embedding)`` for LoRA+'s groups (:func:`loraplus_groups`)."""
    kind = OPTIMIZERS.get(name)
    if kind is None:
        raise LorafitError(f"optimizer {name!r}: use one of: {', '.join(OPTIMIZERS)}")
    groups = loraplus_groups(model, lr, *loraplus) if loraplus else param_groups(model, weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.0)
    if kind in BNB_KINDS:
        return bnb_optimizer(kind, groups, lr, betas, eps)
    if kind in TORCHAO_KINDS:
        return torchao_optimizer(kind, groups, lr, betas, eps)
    # Every AdamW name: torch's AdamW, fused (one kernel over all tensors, on CUDA and CPU) wherever torch has
    # it. The default multi-tensor path makes a temporary as large as all trainable parameters (GBs in full
    # fine-tuning); the per-tensor one, two of the largest tensor, and on CPU it was 5× slower for a LoRA
    # adapter (210 tensors of 135M: 25.7 vs 4.8 ms a step, 2 threads).
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=can_fuse(groups) or None)


# axolotl's bitsandbytes optimizer kinds -> (bitsandbytes class, the class where paging does not apply)
BNB_KINDS = {"adamw_8bit": ("AdamW8bit", "AdamW8bit"), "paged_adamw_8bit": ("PagedAdamW8bit", "AdamW8bit"),
             "paged_adamw_32bit": ("PagedAdamW32bit", "AdamW32bit")}


def bnb_optimizer(kind: str, groups: list[dict], lr: float, betas: tuple[float, float],
                  eps: float) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW for ``kind``: 8-bit states (block-wise quantized, 2 bytes a parameter for both
    moments; tensors under 4096 elements keep 32-bit states, bitsandbytes' ``min_8bit_size``), paged or not.
    Paging moves states to CPU memory under CUDA memory pressure; without CUDA it cannot apply, so the plain
    class runs and ``optimizer.lorafit_notice`` says so."""
    from lorafit.kernels.nf4 import bnb

    paged, plain = BNB_KINDS[kind]
    on_cuda = any(p.device.type == "cuda" for g in groups for p in g["params"])
    name = paged if on_cuda else plain
    opt = getattr(bnb().optim, name)(groups, lr=lr, betas=betas, eps=eps)
    if name != paged:
        opt.lorafit_notice = f"{kind}: paged optimizer states need CUDA; running bitsandbytes' {plain} on the CPU"
    return opt


# axolotl's torchao optimizer kinds -> torchao.optim's class (transformers' ``adamw_torch_8bit`` / ``_4bit``)
TORCHAO_KINDS = {"torchao_8bit": "AdamW8bit", "torchao_4bit": "AdamW4bit"}
# what transformers' Trainer passes to both (its ``optim_args`` defaults): 256-element blocks, no stochastic rounding
TORCHAO_BLOCK = 256


def torchao_optimizer(kind: str, groups: list[dict], lr: float, betas: tuple[float, float],
                      eps: float) -> torch.optim.Optimizer:
    """torchao's AdamW8bit / AdamW4bit as transformers' Trainer builds them for ``adamw_torch_8bit`` /
    ``adamw_torch_4bit``: both moments block-quantized (dynamic-tree 8-bit or 4-bit codes with an fp32 scale per
    256 elements); tensors under 4096 elements, or not a multiple of the block, keep plain states. Each
    parameter's update is one ``torch.compile``d function (torchao's design; it compiles on the first step)."""
    cls = getattr(torchao_optim(), TORCHAO_KINDS[kind])
    return cls(groups, lr=lr, betas=betas, eps=eps, block_size=TORCHAO_BLOCK, bf16_stochastic_round=False)


def torchao_optim():
    """``torchao.optim``, imported without the warnings torchao logs on a machine lacking its CUDA extensions."""
    import warnings

    from lorafit.models import torchao_import_quiet

    # torch's AOT cache remarks on torchao's state tensors at the first compiled step; nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*does not implement _stable_hash_for_caching")
    try:
        with torchao_import_quiet():
            import torchao.optim
    except ImportError as e:
        raise LorafitError(f"optimizer adamw_torch_8bit / adamw_torch_4bit needs torchao ({e}); "
                           "pip install torchao, or use adamw_8bit (bitsandbytes)") from None
    return torchao.optim


def optimizer_from_config(model: nn.Module, cfg) -> torch.optim.Optimizer:
    loraplus = (cfg.loraplus_lr_ratio, cfg.loraplus_lr_embedding) if cfg.loraplus_lr_ratio else None
    return build_optimizer(model, cfg.optimizer, cfg.learning_rate, cfg.weight_decay,
                           (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_epsilon, loraplus=loraplus)


FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def can_fuse(groups: list[dict]) -> bool:
    """Whether torch's fused AdamW takes these parameters (it checks only at the first step, so ask before)."""
    return all(p.device.type in ("cpu", "cuda") and p.dtype in FUSED_DTYPES for g in groups for p in g["params"])


def use_fused(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict``: a checkpoint's param groups bring back the ``fused`` flag they were saved
    with (older checkpoints: none); keep the fused kernel wherever it applies."""
    if isinstance(optimizer, torch.optim.AdamW) and can_fuse(optimizer.param_groups):
        for g in optimizer.param_groups:
            g["fused"], g["foreach"] = True, None


def warmup_steps(cfg, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    if cfg.warmup_ratio is not None:
        return math.ceil(cfg.warmup_ratio * total_steps)
    return 0


# transformers' four schedules (``transformers.optimization``), factor by factor. Written here because importing
# that module imports its Trainer's utilities, and with them PEFT and bitsandbytes: 2-3 s of every ``lorafit train``
# on a 2-core CPU, for four formulas. tests/test_optim.py holds them equal to ``transformers.get_scheduler``.
def _warmup(step: int, warmup: int) -> float:
    return float(step) / float(max(1, warmup))


def _constant(step: int, *, warmup: int, total: int) -> float:
    return _warmup(step, warmup) if step < warmup else 1.0


def _linear(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def _cosine(step: int, *, warmup: int, total: int) -> float:  # half a cosine wave (num_cycles 0.5) down to 0
    if step < warmup:
        return _warmup(step, warmup)
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))  # transformers' π · 0.5 · 2.0 is exactly π


_SCHEDULES = {"cosine": _cosine, "linear": _linear, "constant": _constant, "constant_with_warmup": _constant}


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup: int, total_steps: int):
    """transformers' schedule ``name`` (cosine, linear, constant, constant_with_warmup) with ``warmup`` steps, as
    the ``LambdaLR`` ``transformers.get_scheduler`` makes (same factors, same state dict)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(_SCHEDULES[name], warmup=warmup, total=total_steps))


def scheduler_from_config(optimizer: torch.optim.Optimizer, cfg, total_steps: int):
    return build_scheduler(optimizer, cfg.lr_scheduler, warmup_steps(cfg, total_steps), total_steps)
