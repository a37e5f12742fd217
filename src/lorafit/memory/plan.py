"""``lorafit plan``: the fastest settings that fit a GPU, written as an axolotl-style YAML config.

Search order (first fit wins): full sequence length before shorter ones (only with ``allow_shorter_seq``);
the user's rank and target set before smaller ones (quality); no gradient checkpointing before checkpointing
(checkpointing recomputes the forward, ~30% slower); then the largest micro-batch that divides the effective
batch (gradient accumulation keeps the effective batch). Over N processes (``Settings.nproc``) the memory is one
rank's and the effective batch is split over the ranks; when a whole replica (DDP) fits nowhere, the same search
runs under FSDP2 (each device holds 1/N of the weights). When LoRA fits nowhere, the same search runs over a
4-bit NF4 base (QLoRA: slower steps, the dequantization, but a quarter of the weights' memory).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from lorafit.memory.estimate import Estimate, Settings, estimate
from lorafit.memory.spec import ModelSpec

SAFETY_MARGIN = 0.10


@dataclass
class Plan:
    estimate: Estimate | None
    budget: int
    gpu_bytes: int
    micro_batch: int
    grad_accum: int
    tried: int
    closest: Estimate | None = None
    reason: str = ""
    note: str = ""  # what the search changed beyond the grid, e.g. QLoRA when LoRA does not fit

    @property
    def fits(self) -> bool:
        return self.estimate is not None


def _target_sets(spec: ModelSpec, first):
    names = spec.module_names()
    attn = [n for n in names if n in ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "c_attn")]
    qv = [n for n in names if n in ("q_proj", "v_proj", "qkv_proj", "c_attn")]
    out = [first]
    for t in ("all-linear", attn, qv):
        if t and t not in out:
            out.append(t)
    return out


def search(spec: ModelSpec, base: Settings, gpu_bytes: int, effective_batch: int = 8,
           allow_shorter_seq: bool = False, margin: float = SAFETY_MARGIN, min_seq: int = 256) -> Plan:
    """The first setting that fits ``gpu_bytes`` (per device; with ``base.nproc`` > 1, per rank). Over several
    processes the search goes DDP (a whole replica per device), then FSDP2 (1/N of the weights per device),
    then QLoRA with DDP, then QLoRA with FSDP2 (the 4-bit base sharded); on one, LoRA then QLoRA."""
    plan = _search(spec, base, gpu_bytes, effective_batch, allow_shorter_seq, margin, min_seq)
    if plan.fits or base.method != "lora":
        return plan
    tried = plan.tried
    if base.nproc > 1 and not base.fsdp:  # any base: FSDP2 shards dense, 4-bit and 8-bit weights alike
        f = _search(spec, replace(base, fsdp=True), gpu_bytes, effective_batch, allow_shorter_seq, margin, min_seq)
        f.tried += tried
        tried = f.tried
        if f.fits:
            whole = plan.closest.total / 1024**3
            f.note = (f"one device cannot hold a whole replica (DDP needs at least {whole:.1f} GiB per device); "
                      f"FSDP2 over {base.nproc} processes shards the weights, adapter, gradients and optimizer "
                      f"states 1/{base.nproc} per device and fits")
            return f
    if base.four_bit:
        return plan
    q = _search(spec, replace(base, four_bit="nf4", eight_bit=False, fsdp=False), gpu_bytes, effective_batch, allow_shorter_seq,
                margin, min_seq)
    q.tried += tried
    if q.fits:
        q.note = ("LoRA on a 16-bit base fits no setting" + (" (DDP or FSDP2)" if base.nproc > 1 else "")
                  + "; QLoRA (a 4-bit NF4 base) does")
    if q.fits or base.nproc == 1 or base.fsdp:
        return q
    qf = _search(spec, replace(base, four_bit="nf4", eight_bit=False, fsdp=True), gpu_bytes, effective_batch,
                 allow_shorter_seq, margin, min_seq)
    if not qf.fits:
        return q
    qf.tried += q.tried
    qf.note = (f"neither LoRA (DDP or FSDP2) nor QLoRA with a whole 4-bit replica per device fits; QLoRA with FSDP2 "
               f"shards the 4-bit base 1/{base.nproc} per device and fits")
    return qf


def _search(spec: ModelSpec, base: Settings, gpu_bytes: int, effective_batch: int, allow_shorter_seq: bool,
            margin: float, min_seq: int) -> Plan:
    budget = int(gpu_bytes * (1 - margin))
    seqs = [base.seq_len]
    if allow_shorter_seq:
        s = base.seq_len // 2
        while s >= min_seq:
            seqs.append(s)
            s //= 2
    per_rank = effective_batch // base.nproc  # each optimizer step: micro-batch × accumulation × ranks
    micro = [m for m in range(per_rank, 0, -1) if per_rank % m == 0]
    if base.method == "lora":
        ranks = [base.r] + [r for r in (16, 8, 4) if r < base.r]
        quality = [(r, t) for t in _target_sets(spec, base.targets) for r in ranks]
    else:
        quality = [(base.r, base.targets)]
    best, tried = None, 0
    for seq in seqs:
        for r, targets in quality:
            for ckpt in (False, True):
                for mb in micro:
                    s = replace(base, seq_len=seq, r=r, targets=targets, gradient_checkpointing=ckpt, micro_batch=mb)
                    est = estimate(spec, s)
                    tried += 1
                    if best is None or est.total < best.total:
                        best = est
                    if est.total <= budget:
                        return Plan(est, budget, gpu_bytes, mb, per_rank // mb, tried)
    return Plan(None, budget, gpu_bytes, 0, 0, tried, closest=best, reason=_why(best, budget))


def _why(est: Estimate, budget: int) -> str:
    GiB = 1024**3
    biggest = max(est.components, key=lambda c: c.at_peak)
    fixed = est.component("weights").bytes
    if fixed > budget:
        return (f"the weights alone need {fixed / GiB:.1f} GiB, more than the {budget / GiB:.1f} GiB budget; "
                "use a smaller model or a bigger GPU" + (" (QLoRA's 4-bit weights counted)" if
                                                          est.settings.four_bit else ""))
    return (f"smallest setting needs {est.total / GiB:.1f} GiB (budget {budget / GiB:.1f} GiB); largest part: "
            f"{biggest.name} {biggest.at_peak / GiB:.1f} GiB")


def to_yaml(plan: Plan, base_model: str, effective_batch: int, base_model_note: str | None = None) -> str:
    """The plan as a training config. ``base_model_note``: a comment for the base_model line (a placeholder)."""
    s = plan.estimate.settings
    lines = [
        f"# Written by `lorafit plan`: estimated peak {plan.estimate.total / 1024**3:.2f} GiB of "
        f"{plan.gpu_bytes / 1024**3:.2f} GiB (budget {plan.budget / 1024**3:.2f} GiB with safety margin)"
        + (f" per rank of {s.nproc}; run it with `lorafit train CONFIG --nproc {s.nproc}`." if s.nproc > 1 else "."),
        f"base_model: {json.dumps(base_model)}" + (f"  # {base_model_note}" if base_model_note else ""),
        f"adapter: {('qlora' if s.four_bit else 'lora') if s.method == 'lora' else 'none'}",
    ]
    if s.eight_bit:
        lines.append("load_in_8bit: true")
    if s.four_bit:
        lines.append("load_in_4bit: true")
        if s.four_bit != "nf4" or not s.double_quant:
            lines.append(f"bnb_config_kwargs: {{bnb_4bit_quant_type: {s.four_bit}, "
                         f"bnb_4bit_use_double_quant: {str(s.double_quant).lower()}}}")
    if s.method == "lora":
        lines += [f"lora_r: {s.r}", f"lora_alpha: {s.alpha:g}", f"lora_dropout: {s.dropout:g}"]
        if s.targets == "all-linear":
            lines.append("lora_target_linear: true")
        elif isinstance(s.targets, str):  # a regex: one quoted string (JSON's quoting is YAML's)
            lines.append(f"lora_target_modules: {json.dumps(s.targets)}")
        else:
            lines.append("lora_target_modules:" + "".join(f"\n  - {t}" for t in s.targets))
        if s.layers_to_transform is not None:
            lines.append(f"lora_layers_to_transform: {json.dumps(s.layers_to_transform)}")
    if s.fsdp:  # axolotl's spelling; lorafit shards with FSDP2 (fully_shard per decoder layer, then the root)
        lines += ["fsdp_version: 2", "fsdp_config:", "  reshard_after_forward: true"]
    lines += [
        f"sequence_len: {s.seq_len}",
        f"sample_packing: {'true' if s.packing else 'false'}",
        f"micro_batch_size: {s.micro_batch}",
        f"gradient_accumulation_steps: {effective_batch // (s.micro_batch * s.nproc)}",
        f"gradient_checkpointing: {'true' if s.gradient_checkpointing else 'false'}",
        f"bf16: {'true' if s.dtype == 'bfloat16' else 'false'}",
        *(["fp16: true"] if s.dtype == "float16" else []),
        f"optimizer: {axolotl_optimizer(s.optimizer)}",
        "learning_rate: 0.0002",
        "num_epochs: 1",
        "datasets:  # edit: your data",
        "  - path: data/train.jsonl",
        "    type: alpaca",
        "output_dir: ./lora-out",
    ]
    return "\n".join(lines) + "\n"


def axolotl_optimizer(name: str) -> str:
    """The name axolotl knows for ``name`` (lorafit also accepts the bare ``adamw``, torch's AdamW)."""
    return "adamw_torch" if name == "adamw" else name
