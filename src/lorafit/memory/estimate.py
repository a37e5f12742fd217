"""The analytic memory model of one ``lorafit train`` step: bytes per component, each with its formula.

What is modelled is lorafit's own step (``lorafit.train.train_step``): the base in ``dtype``; for LoRA,
fp32 adapter weights, fp32 gradients and fp32 AdamW states, and :class:`lorafit.lora.LoraLinearFunction`'s
saved tensors (the layer input by reference, ``x·Aᵀ``, a dropout seed; DoRA adds its magnitude vector and
``lorafit.kernels.dora``'s saved tensors); the chunked loss of
``lorafit.kernels.loss`` (no full logits); torch's AdamW (two states in the parameter's dtype).

Activations are counted from first principles per decoder layer, tensor by tensor, as the HF modules save
them for backward (see :mod:`lorafit.memory.activations`). The step's peak is the largest of five moments:

* **loss** — end of forward: all saved activations + the loss buffers (hidden-state copies, the gradient
  the chunked loss computes in forward, one chunk of fp32 logits);
* **loss backward** — all activations + the loss's backward: for full fine-tuning the head's fp32 gradient,
  its scaled copy and (bf16/fp16) its cast to the weight's dtype, live together;
* **backward start** — all activations + the first layer's backward temporaries;
* **backward end** — all gradients + the last layer's backward temporaries (matters for full fine-tuning);
* **optimizer step** — all gradients + optimizer states + the update's temporaries.

Optimizer states exist from the first step on, so they are in all five moments of every later step.

Under torchrun (``Settings.nproc`` > 1) the estimate is one rank's: DDP adds its gradient buckets to a whole
replica; FSDP2 holds 1/N of the persistent parts and adds what is gathered at each moment, plus a sixth moment,
the forward's start, when the root and the first group are gathered before any activation exists
(:mod:`lorafit.memory.parallel`, :func:`_distributed`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from lorafit import dtypes
from lorafit import targets as targets_rule
from lorafit.config import OPTIMIZERS
from lorafit.errors import LorafitError
from lorafit.memory import activations as act
from lorafit.memory import parallel as par
from lorafit.memory.spec import HEAD, ModelSpec
from lorafit.options import RuntimeOptions

GiB = 1024**3
# Outside the allocator on a GPU: CUDA context, cuBLAS/cuDNN workspaces (measured 0.4-0.6 GiB on recent cards).
CUDA_CONTEXT_BYTES = int(0.5 * GiB)
# Allocator slack between reserved and allocated memory at the peak (caching allocator, block rounding).
ALLOCATOR_FRACTION = 0.05
# Optimizer states per trainable parameter, by optimizer kind (``lorafit.config.OPTIMIZERS``).
OPTIMIZER_STATES = {"adamw": 2, "sgd": 0, "adamw_8bit": 2, "paged_adamw_8bit": 2, "paged_adamw_32bit": 2,
                    "torchao_8bit": 2, "torchao_4bit": 2}
# bitsandbytes' 8-bit optimizers: states of tensors with fewer elements stay 32-bit (its ``min_8bit_size``); an
# 8-bit state has an fp32 absmax per 256-element block and a 256-entry fp32 quantization map, per state.
BNB_MIN_8BIT, BNB_STATE_BLOCK, BNB_QMAP = 4096, 256, 256
# torchao's AdamW8bit / AdamW4bit (as transformers runs them): tensors of at least 4096 elements that fill whole
# 256-element blocks get codes (1 or ½ B an element), an fp32 scale per block and a 256- or 16-entry fp32 map, per
# state; the others keep plain fp32 states.
TORCHAO_MIN, TORCHAO_BLOCK, TORCHAO_QMAP = 4096, 256, {"torchao_8bit": 256, "torchao_4bit": 16}


@dataclass
class Settings:
    """What a training run chooses. Defaults follow ``lorafit train``'s config defaults."""

    method: str = "lora"  # "lora" | "full" ("qlora": lora with four_bit "nf4")
    dtype: str = "bfloat16"
    micro_batch: int = 1
    seq_len: int = 2048
    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.05
    use_dora: bool = False  # DoRA: a magnitude per output row, and what its layers save (memory.activations)
    four_bit: str | None = None  # QLoRA: the decoder linears in 4 bits ("nf4" / "fp4"), or None for a dense base
    double_quant: bool = True  # the 4-bit blocks' absmax quantized again (QLoRA's double quantization)
    eight_bit: bool = False  # load_in_8bit: the decoder linears as LLM.int8 (int8 codes + fp32 row scales), LoRA on top
    targets: list[str] | str = "all-linear"
    layers_to_transform: list[int] | None = None  # decoder blocks that get an adapter (None: all)
    rank_pattern: dict[str, int] = field(default_factory=dict)  # module name/regex -> rank (PEFT's rule)
    modules_to_save: list[str] | None = None  # LoRA: modules trained in full (embed_tokens, lm_head are counted)
    optimizer: str = "adamw"  # an optimizer name of lorafit.config.OPTIMIZERS
    gradient_checkpointing: bool = False
    offload_checkpoints: bool = False  # gradient_checkpointing: offload: the layer inputs in host memory (on CUDA)
    packing: bool = False
    loss: str = "chunked"  # "chunked" (lorafit) | "hf" (plain transformers loss: full logits)
    loss_chunk_tokens: int | None = None  # None: lorafit's default for the vocabulary
    # rl: "dpo" | "orpo" | "kto" (preference training) or None. micro_batch counts the sequences of the forward
    # that trains: a DPO/ORPO micro-batch of N pairs is 2N; KTO's N rows are N (its KL rows run without autograd)
    rl: str | None = None
    device: str = "cuda"  # "cuda" adds context/allocator overhead; "cpu" adds none
    nproc: int = 1  # processes (ranks) training together; the estimate is then one rank's
    fsdp: bool = False  # FSDP2 (shards per decoder layer) rather than DDP (a full replica per rank)
    # How the kernels run (compiled or not; bf16 matmuls on fp32 copies on a CPU): the rules of training.
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions.resolve)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        self.method = {"none": "full", "": "full", "full": "full", "lora": "lora"}.get(str(self.method).lower(), self.method)
        if self.method == "qlora":
            self.method, self.four_bit = "lora", self.four_bit or "nf4"
        if self.method not in ("lora", "full"):
            raise LorafitError(f"method: got {self.method!r}, use lora, qlora or full")
        if self.four_bit is not None and (self.method != "lora" or self.four_bit not in ("nf4", "fp4")):
            raise LorafitError(f"four_bit: got {self.four_bit!r} for {self.method}; a 4-bit base (nf4 or fp4) "
                               "takes LoRA (qlora)")
        self.eight_bit = bool(self.eight_bit)
        if self.eight_bit and (self.method != "lora" or self.four_bit or self.use_dora):
            raise LorafitError("eight_bit: an 8-bit base takes plain LoRA (not full fine-tuning, QLoRA or DoRA)")
        self.dtype = dtypes.canonical(self.dtype)
        self.optimizer = str(self.optimizer).lower()
        if self.optimizer not in OPTIMIZERS:
            raise LorafitError(f"optimizer: got {self.optimizer!r}, use one of: {', '.join(OPTIMIZERS)}")
        for name in ("micro_batch", "seq_len", "r", "nproc"):
            _check_positive(name.replace("_", "-"), getattr(self, name))
        if self.seq_len < 2:
            raise LorafitError(f"seq-len: got {self.seq_len}, must be at least 2 (one token predicts the next)")
        if not 0 <= float(self.dropout) < 1:
            raise LorafitError(f"lora dropout: got {self.dropout!r}, must be in [0, 1)")
        if self.rl not in (None, "dpo", "orpo", "kto"):
            raise LorafitError(f"rl: got {self.rl!r}, use dpo, orpo or kto")
        if self.rl in ("dpo", "kto") and self.method == "full":
            raise LorafitError(f"rl: {self.rl} with full fine-tuning needs a second, frozen copy of the model as "
                               "its reference, which lorafit does not train; use an adapter")
        if self.rl in ("dpo", "orpo") and self.micro_batch % 2:
            raise LorafitError(f"micro-batch: got {self.micro_batch} for rl: {self.rl}; a batch of N pairs runs 2N "
                               "sequences, an even number")
        if self.loss not in ("chunked", "hf"):
            raise LorafitError(f"loss: got {self.loss!r}, use chunked or hf")
        if self.loss_chunk_tokens is not None and self.loss_chunk_tokens <= 0:
            raise LorafitError(f"loss chunk tokens: got {self.loss_chunk_tokens}, must be > 0")
        if self.device not in ("cuda", "cpu"):
            raise LorafitError(f"device: got {self.device!r}, use cuda or cpu")
        if not self.targets:
            raise LorafitError("lora targets: empty; give module names like q_proj,v_proj or all-linear")
        if self.layers_to_transform is not None and not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers_to_transform):
            raise LorafitError(f"layers to transform: got {self.layers_to_transform!r}, "
                               "must be layer indices >= 0")
        self.rank_pattern = dict(self.rank_pattern or {})
        self.modules_to_save = list(self.modules_to_save) if self.modules_to_save else None
        for key, value in self.rank_pattern.items():
            _check_positive(f"rank_pattern[{key!r}]", value)
        self.fsdp = bool(self.fsdp)
        if self.fsdp and self.method != "lora":
            raise LorafitError("fsdp: full fine-tuning over FSDP2 is not supported yet; use LoRA with FSDP2")
        if isinstance(self.runtime, dict):  # from to_dict(), e.g. a stored benchmark row
            self.runtime = RuntimeOptions(**self.runtime)

    @property
    def bytes(self) -> int:
        return dtypes.BYTES[self.dtype]

    @property
    def lean(self) -> bool:
        """Whether the LoRA layers take the fused paths (groups, the gated MLP's LoRA down_proj): plain LoRA
        and QLoRA do, DoRA and LoRA over an 8-bit base do not (``lorafit.lora.variants``)."""
        return not (self.use_dora or self.eight_bit)

    @property
    def optimizer_kind(self) -> str:
        """``"adamw"`` or ``"sgd"``: what the named optimizer keeps per parameter."""
        return OPTIMIZERS[self.optimizer]

    @property
    def effective_matmul_dtype(self) -> str:
        """The dtype the frozen matmuls run in: a trained (full fine-tuning) base is never upcast."""
        if self.method != "lora":
            return self.dtype
        return self.runtime.matmul_dtype(self.dtype, self.device, self.tokens)

    @property
    def upcast(self) -> bool:
        """Whether the frozen matmuls run on fp32 copies of the bf16 tensors (see ``lorafit.options``)."""
        return self.effective_matmul_dtype != self.dtype

    def upcast_head(self, numel: int) -> bool:
        """Whether the chunked loss runs on an fp32 copy of a (frozen) head of ``numel`` elements."""
        return self.upcast and self.runtime.head_copy_allowed(numel)  # the rule training uses

    @property
    def compute_bytes(self) -> int:
        return dtypes.BYTES[self.effective_matmul_dtype]

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len

    def to_dict(self) -> dict:
        return asdict(self)


def _check_positive(name: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise LorafitError(f"{name}: got {v!r}, must be an integer > 0")


@dataclass
class Component:
    name: str
    bytes: int  # size of the whole component
    at_peak: int  # how much of it is resident at the peak moment
    formula: str

    def to_dict(self) -> dict:
        return {"name": self.name, "bytes": self.bytes, "gib": round(self.bytes / GiB, 3),
                "at_peak_bytes": self.at_peak, "formula": self.formula}


@dataclass
class Estimate:
    spec: ModelSpec
    settings: Settings
    components: list[Component]
    peak_moment: str
    moments: dict[str, int]
    activation_per_layer: int
    params: dict[str, int] = field(default_factory=dict)

    @property
    def allocated_peak(self) -> int:
        """Peak of tensor memory (what the allocator's ``max_memory_allocated`` / MemTracker report)."""
        return max(self.moments.values())

    @property
    def total(self) -> int:
        return sum(c.at_peak for c in self.components)

    def component(self, name: str) -> Component:
        return next(c for c in self.components if c.name == name)

    def to_dict(self) -> dict:
        return {
            "model": self.spec.to_dict(), "settings": self.settings.to_dict(), "params": self.params,
            "matmul_dtype": self.settings.effective_matmul_dtype,
            "components": [c.to_dict() for c in self.components], "peak_moment": self.peak_moment,
            "moments": self.moments, "activation_per_layer_bytes": self.activation_per_layer,
            "allocated_peak_bytes": self.allocated_peak, "total_peak_bytes": self.total,
            "total_peak_gib": round(self.total / GiB, 3),
        }


def lora_targets(spec: ModelSpec, s: Settings) -> act.Adapters:
    """Per decoder block, the linear layers the adapter wraps (path inside the block → rank); none for full
    fine-tuning. ``lorafit.targets``' rule on the module paths the transformers model has
    (``model.layers.3.self_attn.q_proj``), as ``lorafit.lora`` applies it to the live model."""
    if s.method != "lora":
        return [{} for _ in range(spec.layers)]
    adapters = [_block_targets(spec, s, i) for i in range(spec.layers)]
    _check_matched(spec, s, adapters, [p for p, _ in outside_targets(spec, s)])
    return adapters


def outside_targets(spec: ModelSpec, s: Settings) -> list[tuple[str, int]]:
    """The token embeddings and the output head when they are LoRA targets (path, rank): named explicitly or by
    a regex, never by ``all-linear`` (the head is left out; the embeddings are no linear layer). Like any path
    outside the decoder blocks, they have no layer index, so ``layers_to_transform`` leaves them out."""
    if s.method != "lora" or s.targets == targets_rule.ALL_LINEAR:
        return []
    out = [(p, int(targets_rule.pattern_value(s.rank_pattern, p, s.r))) for p in (spec.embedding_path, HEAD)
           if targets_rule.selected(p, s.targets, s.layers_to_transform)]
    if s.use_dora and any(p == spec.embedding_path for p, _ in out):
        raise LorafitError(f"lora target {spec.embedding_path!r} is an embedding: DoRA is for linear layers here; "
                           "use plain LoRA for it (or leave it out of lora_target_modules)")
    return out


def outside_blocks(spec: ModelSpec, s: Settings) -> tuple[list[int], list[int], int]:
    """Trained tensors outside the decoder blocks, as element counts: LoRA on the embeddings / head (A, B; DoRA's
    magnitude on the head), the ``modules_to_save`` tables (trained in place, in the base dtype), and the copy
    a tied table gets when a side of it is trained in full (as PEFT trains a copy: the two sides untie)."""
    V, d = spec.vocab, spec.hidden
    lora = []
    for path, r in outside_targets(spec, s):
        lora += [r * (V if path == spec.embedding_path else d), r * (d if path == spec.embedding_path else V)]
        if path == HEAD and s.use_dora:
            lora.append(V)
    names = (s.modules_to_save or []) if s.method == "lora" else []
    saved = [V * d for p in (spec.embedding_path, HEAD) if names and targets_rule.name_matches(p, names)]
    copies = V * d if spec.tied_embeddings and saved else 0
    return lora, saved, copies


def _block_targets(spec: ModelSpec, s: Settings, layer: int) -> dict[str, int]:
    prefix, out = spec.block_prefix(layer), {}
    for name, *_ in spec.linear_layers():
        path = f"{prefix}.{name}"
        if targets_rule.selected(path, s.targets, s.layers_to_transform, {HEAD}):
            out[name] = int(targets_rule.pattern_value(s.rank_pattern, path, s.r))
    return out


def _check_matched(spec: ModelSpec, s: Settings, adapters: act.Adapters, outside: list[str]) -> None:
    """One-line errors for a target that matches nothing, as training would raise them."""
    paths = [f"{spec.block_prefix(i)}.{n}" for i, w in enumerate(adapters) for n in w] + outside
    where = f" in layers {s.layers_to_transform}" if s.layers_to_transform is not None else ""
    has = f"this model has: {', '.join([*spec.module_names(), spec.embedding_path.split('.')[-1], HEAD])}"
    for t in targets_rule.unmatched_names(s.targets, paths):
        raise LorafitError(f"lora target {t!r} matches no linear layer of {spec.name}{where}; {has}")
    if not paths and isinstance(s.targets, str) and s.targets != targets_rule.ALL_LINEAR:
        example = f"{spec.block_prefix(0)}.{spec.linear_layers()[0][0]}"
        raise LorafitError(f"lora target regex {s.targets!r} matches no linear layer of {spec.name}{where} "
                           f"(a regex matches the whole path, e.g. {example}); {has}")
    if not paths:
        raise LorafitError(f"lora targets {s.targets!r} match no linear layer of {spec.name}{where}; {has}")


@dataclass
class _Sizes:
    """The persistent parts of a step, in bytes (see :func:`estimate`)."""

    params: int
    adapter: int  # LoRA parameters (0 for full fine-tuning)
    trainable: int
    weights: int
    adapter_bytes: int
    grads: int
    states: int
    n_states: int
    state_elt: int

    @property
    def persistent(self) -> int:
        return self.weights + self.adapter_bytes + self.states


def _sizes(spec: ModelSpec, s: Settings, adapters: act.Adapters) -> _Sizes:
    e, lora = s.bytes, s.method == "lora"
    params = spec.total_params()
    dora = {n: o if s.use_dora else 0 for n, _, o, _ in spec.linear_layers()}  # DoRA's magnitude vector
    shapes = {n: i + o for n, i, o, _ in spec.linear_layers()}
    adapter = sum(r * shapes[n] + dora[n] for w in adapters for n, r in w.items())
    out_lora, saved, copies = outside_blocks(spec, s)
    adapter += sum(out_lora)
    saved_n = sum(saved)  # modules_to_save: trained in place in the base dtype (grads and states too)
    trainable = adapter + saved_n if lora else params
    state_elt = 4 if lora else e  # LoRA: fp32 adapter, gradients and states; full: the parameters' dtype
    n_states = OPTIMIZER_STATES[s.optimizer_kind]
    states = n_states * (adapter * state_elt + saved_n * e) if lora else n_states * trainable * state_elt
    if s.optimizer_kind in LOW_BIT:
        states = sum(optimizer_state_bytes(s.optimizer_kind, n) for n in _trainable_tensors(spec, s, adapters))
    if s.dtype == "float16":
        states += LOSS_SCALER_BYTES
    weights = (params + copies) * e
    if s.four_bit:
        linear = [i * o for _, i, o, _ in spec.linear_layers()] * spec.layers
        weights = (params + copies - sum(linear)) * e + sum(four_bit_bytes(n, s.double_quant) for n in linear)
    if s.eight_bit:  # int8 codes, 1 B an element, and an fp32 scale per output row (bitsandbytes' SCB)
        linear = [(i, o) for _, i, o, _ in spec.linear_layers()] * spec.layers
        weights = (params + copies - sum(i * o for i, o in linear)) * e + sum(i * o + 4 * o for i, o in linear)
    # DPO's and KTO's reference reads the modules_to_save tables as they started: a frozen copy of each
    # (lorafit.train.preference.starting_weights)
    weights += reference_copies(s, saved_n)
    return _Sizes(params, adapter, trainable, weights, adapter * 4, adapter * 4 + saved_n * e if lora else params * e,
                  states, n_states, state_elt)


def reference_copies(s: Settings, saved_n: int) -> int:
    """Bytes of the starting copies of the modules_to_save tables the reference of ``rl: dpo`` / ``kto`` reads."""
    return saved_n * s.bytes if s.rl in ("dpo", "kto") else 0


def four_bit_bytes(numel: int, double_quant: bool) -> int:
    """Bytes of one bitsandbytes 4-bit weight of ``numel`` elements: packed codes, the blocks' absmax (8-bit
    under double quantization, with its own fp32 absmax, offset and map), and the 16-entry codebook."""
    return sum(t.numel * t.elt for t in par.four_bit_tensors(numel, double_quant))


LOW_BIT = ("adamw_8bit", "paged_adamw_8bit", "torchao_8bit", "torchao_4bit")
# fp16's dynamic loss scaling (torch's GradScaler): its scale (fp32) and growth tracker (int32), one each
LOSS_SCALER_BYTES = 8


def optimizer_state_bytes(kind: str, numel: int) -> int:
    """Both AdamW states of one fp32 tensor of ``numel`` elements under a low-bit optimizer ``kind``."""
    if kind.startswith("torchao"):
        if numel < TORCHAO_MIN or numel % TORCHAO_BLOCK:
            return 2 * 4 * numel
        codes = numel if kind == "torchao_8bit" else numel // 2
        return 2 * (codes + 4 * (numel // TORCHAO_BLOCK) + 4 * TORCHAO_QMAP[kind])
    return _bnb_state_bytes(numel)


def _bnb_state_bytes(numel: int) -> int:
    """Both AdamW states of one tensor in bitsandbytes' 8-bit optimizer."""
    if numel < BNB_MIN_8BIT:
        return 2 * 4 * numel
    return 2 * (numel + 4 * -(-numel // BNB_STATE_BLOCK) + 4 * BNB_QMAP)


def _trainable_tensors(spec: ModelSpec, s: Settings, adapters: act.Adapters) -> list[int]:
    """Element counts of the trained tensors, one by one (bitsandbytes quantizes states per tensor)."""
    if s.method == "lora":
        shapes = {n: (i, o) for n, i, o, _ in spec.linear_layers()}
        out_lora, saved, _ = outside_blocks(spec, s)
        return [n for w in adapters for name, r in w.items()
                for n in (r * shapes[name][0], r * shapes[name][1])] + out_lora + saved
    per_layer = [i * o for _, i, o, _ in spec.linear_layers()]
    rest = spec.layer_params() - sum(per_layer)  # biases and norms: small tensors, 32-bit states
    out = per_layer * spec.layers + [rest // 2] * (2 * spec.layers) + [spec.final_norm_params()]
    out += [spec.vocab * spec.hidden] + ([spec.head_params()] if spec.head_params() else [])
    return out + ([spec.max_positions * spec.hidden] if spec.max_positions else [])


def estimate(spec: ModelSpec, settings: Settings) -> Estimate:
    """The peak of one training step; under ``settings.nproc`` > 1 (or FSDP2), one rank's peak."""
    s = settings
    adapters = lora_targets(spec, s)
    z = _sizes(spec, s, adapters)
    dist = _distributed(spec, s, adapters, z)
    z = dist.sizes
    acts = act.activations(spec, s, adapters)  # of this rank's micro-batch: activations are never sharded
    loss = act.loss_buffers(spec, s)
    bw_first = act.backward_temporaries(spec, s, adapters)
    head_grad = loss.head_grad  # full FT: the head/embedding gradient the chunked loss builds in forward
    # No temporaries in optimizer.step(): the trainer's AdamW is fused on CUDA and CPU (``train.optim``) and
    # updates in place (torch's default, foreach, would make one as large as all trainable parameters); SGD none.
    moments = {
        "loss": z.persistent + acts.total + loss.total + head_grad,
        # the loss's backward, first in backward: the head's fp32 gradient, its scaled copy and its cast
        "loss backward": z.persistent + acts.total + act.loss_backward(spec, s),
        "backward start": z.persistent + acts.total + bw_first.total + head_grad,
        # the lowest layer's backward (its saved tensors still resident), then the embedding's gradient (by
        # then every saved activation is freed): one after the other, the larger counts
        "backward end": z.persistent + z.grads + max(act.embedding_backward(spec, s), acts.resident_end),
        "optimizer step": z.persistent + z.grads,
    }
    if "forward start" in dist.extra:  # FSDP2's first all-gathers: before any activation exists
        moments["forward start"] = z.persistent
    moments = {k: v + dist.extra.get(k, 0) for k, v in moments.items()}
    moment = max(moments, key=moments.get)
    comps = _components(spec, s, adapters, z, moment, moments[moment], acts, loss, bw_first, dist)
    return Estimate(spec=spec, settings=s, components=comps, peak_moment=moment, moments=moments,
                    activation_per_layer=acts.per_layer,
                    params={"total": z.params, "trainable": z.trainable, "adapter": z.adapter})


@dataclass
class _Distributed:
    """One rank's persistent sizes and what the strategy adds at each moment (nothing for one process)."""

    sizes: _Sizes
    extra: dict[str, int] = field(default_factory=dict)
    name: str = ""
    formula: dict[str, str] = field(default_factory=dict)


def _distributed(spec: ModelSpec, s: Settings, adapters: act.Adapters, z: _Sizes) -> _Distributed:
    """DDP: the whole replica plus its gradient buckets, at every moment. FSDP2: 1/N of weights, adapter,
    gradients and states (``lorafit.memory.parallel``), plus what is gathered at each moment: the root group
    from forward to the end of backward; each group's all-gather output until the next group is copied out (so
    the last layer's is still there at the loss); in backward the running layer and the prefetched one; a
    layer's whole gradients before their reduce-scatter (and its input buffer) at the first layer's backward.
    A sixth moment, the forward's start, holds the root and the next group (the untied embeddings, else the first
    layer) twice each: parameters and all-gather buffers. Checked against torch's FSDPMemTracker on CPU (gloo)."""
    if s.nproc == 1 and not s.fsdp:
        return _Distributed(z)
    if not s.fsdp:
        bucket = par.ddp_bucket_bytes(z.grads)
        why = (f"DDP's gradient buckets (bucket_cap_mb {par.DDP_BUCKET_CAP_MB}): a flat copy of the "
               f"{z.trainable:,} trainable parameters' gradients, kept all run")
        return _Distributed(z, {k: bucket for k in _MOMENTS}, "DDP gradient buckets", {k: why for k in _MOMENTS})
    n = s.nproc
    out_lora, saved, copies = outside_blocks(spec, s)
    share = par.fsdp_share(spec, n, s.bytes, adapters, s.use_dora, out_lora, saved, copies,
                           s.double_quant if s.four_bit else None, s.eight_bit)
    e = s.bytes
    adapter_shard, saved_shard = share.adapter // 4, (share.grads - share.adapter) // max(e, 1)
    states = z.n_states * (adapter_shard * z.state_elt + saved_shard * e)
    if s.optimizer_kind.endswith("8bit"):
        states = -(-z.states // n)
    sizes = _Sizes(z.params, z.adapter, z.trainable, share.weights, share.adapter, share.grads, states, z.n_states,
                   z.state_elt)
    root, layer = share.root_gathered, share.layer_gathered
    # FSDP2 keeps a group's all-gather output until the next all-gather (its copy-out into the unsharded
    # parameters must finish first): one more gathered group beside those in use, at every moment
    emb = share.embed_gathered  # untied embeddings: their own group, the first after the root
    first = emb or layer
    start = max(2 * root + 2 * first, root + emb + 2 * layer if emb else 0)
    extra = {"forward start": start, "loss": root + layer, "loss backward": root + 2 * layer,
             "backward start": root + 2 * layer, "backward end": root + 2 * layer + 2 * share.layer_grads,
             "optimizer step": 0}
    r, ly = f"root group unsharded {root / GiB:.3f} GiB", f"a decoder layer gathered {layer / GiB:.3f} GiB"
    first_what = f"the embeddings' group {emb / GiB:.3f} GiB" if emb else ly
    formula = {"forward start": f"2 × {r} (its parameters + the all-gather buffer, kept until the next "
                                f"group's copy-out) + 2 × {first_what} (the next group's, likewise)",
               "loss": f"{r} + {ly} (the last layer's all-gather buffer, kept until the next all-gather)",
               "loss backward": f"{r} + 2 × {ly} (the last layer, prefetched by the root's backward: parameters "
                                "+ all-gather buffer)",
               "backward start": f"{r} + 2 × {ly} (current + prefetched; measured: no third copy)",
               "backward end": f"{r} + 2 × {ly} + its whole gradients and their reduce-scatter buffer",
               "optimizer step": "nothing unsharded (resharded after backward)"}
    return _Distributed(sizes, extra, "FSDP2 unsharded (root + layers)", formula)


_MOMENTS = ("loss", "loss backward", "backward start", "backward end", "optimizer step")


def _overhead(s: Settings, peak_alloc: int) -> tuple[int, str]:
    if s.device != "cuda":
        return 0, "CPU: none counted (tensor memory only)"
    return (CUDA_CONTEXT_BYTES + int(ALLOCATOR_FRACTION * peak_alloc),
            f"CUDA context and library workspaces {CUDA_CONTEXT_BYTES / GiB:.2f} GiB + allocator "
            f"slack {ALLOCATOR_FRACTION:.0%} of the allocated peak")


def _components(spec, s: Settings, adapters, z: _Sizes, moment: str, peak_alloc: int, acts, loss,
                bw_first, dist: _Distributed) -> list[Component]:
    """Each part of the step at the peak ``moment`` (and whole), with its formula."""
    e, lora = s.bytes, s.method == "lora"
    grads_at = {"loss": loss.head_grad, "loss backward": 0, "backward start": loss.head_grad,
                "forward start": 0}.get(moment, z.grads)
    emb_last = act.embedding_backward(spec, s) > acts.resident_end  # the embedding's gradient is the later peak
    acts_at = {"loss": acts.total, "loss backward": acts.total, "backward start": acts.total,
               "backward end": 0 if emb_last else acts.resident_end}.get(moment, 0)
    loss_at = loss.total if moment == "loss" else 0
    dist_at = dist.extra.get(moment, 0)
    temp_at = peak_alloc - z.persistent - grads_at - acts_at - loss_at - dist_at
    overhead, overhead_formula = _overhead(s, peak_alloc)
    name = ("trainable weights (LoRA A, B" + (", DoRA magnitude)" if s.use_dora else ")")) if lora \
        else "trainable weights"
    temp_why = {"loss": "loss chunk buffers (included above)",
                "loss backward": "the loss's backward: saved gradients and their scaled copies"
                + (" (head: fp32 saved + fp32 scaled" + (f" + {s.dtype} cast" if s.bytes != 4 else "") + ")"
                   if s.method == "full" else ""),
                "backward start": bw_first.formula,
                "backward end": "last layer's backward temporaries + embedding gradient",
                "optimizer step": "no temporaries (fused AdamW / SGD)",
                "forward start": "none (the first all-gathers, before any activation)"}[moment]
    comps = [
        Component("weights", z.weights, z.weights, _weights_formula(s, z)),
        Component(name, z.adapter_bytes if lora else z.weights, z.adapter_bytes,
                  _adapter_formula(spec, s, adapters, z.adapter) if lora else "all weights (counted above)"),
        Component("gradients", z.grads, grads_at,
                  (f"{z.adapter:,} adapter × 4 B + {z.trainable - z.adapter:,} modules_to_save × {e} B"
                   if lora and z.trainable > z.adapter else f"{z.trainable:,} trainable × {4 if lora else e} B")
                  + ("" if grads_at == z.grads else
                  "; at the peak: the head's fp32 gradient only" if grads_at else
                  "; none at the peak (freed by zero_grad, rebuilt in backward)")),
        Component("optimizer states", z.states, z.states,
                  (f"{z.n_states} states × {z.trainable:,} × ½ B + a scale per {TORCHAO_BLOCK} (torchao 4-bit; tensors "
                   f"under {TORCHAO_MIN} elements 4 B)" if s.optimizer_kind == "torchao_4bit" else
                   f"{z.n_states} states × {z.trainable:,} × 1 B + block absmax ({s.optimizer_kind}; tensors "
                   f"under {BNB_MIN_8BIT} elements 4 B)" if s.optimizer_kind in LOW_BIT else
                   f"{z.n_states} states × ({z.adapter:,} × 4 B + {z.trainable - z.adapter:,} modules_to_save × {e} B)"
                   if lora and z.trainable > z.adapter else
                   f"{z.n_states} states × {z.trainable:,} × {z.state_elt} B") if z.n_states
                  else "SGD without momentum: none"),
        Component("activations", acts.total, acts_at, acts.formula),
        Component("logits/loss", loss.total, loss_at, loss.formula),
        Component("temporary peak", max(temp_at, 0), temp_at, f"at the {moment}: {temp_why}"),
        *([Component(dist.name, max(dist.extra.values()), dist_at, dist.formula[moment])] if dist.name else []),
        Component("framework overhead", overhead, overhead, overhead_formula),
    ]
    if s.dtype == "float16":
        comps[3].formula += f" + fp16 loss scale and growth tracker {LOSS_SCALER_BYTES} B"
    if s.fsdp:  # the persistent parts are this rank's shards
        for c in comps[:4]:
            c.formula += f"; this rank's shard: 1/{s.nproc} (FSDP2, dim 0 padded to a multiple of {s.nproc})"
        if s.four_bit:
            comps[0].formula += " of the codes and absmax; codebooks and nested statistics on every rank"
        if s.eight_bit:
            comps[0].formula += " of the int8 codes and row scales"
    return comps


def _weights_formula(s: Settings, z: _Sizes) -> str:
    e = s.bytes
    why = (f"decoder linears in 4 bits ({s.four_bit}{', double quant' if s.double_quant else ''}: codes + "
           f"absmax + statistics), the rest × {e} B ({s.dtype})" if s.four_bit else
           f"decoder linears in int8 (1 B an element + fp32 row scales), the rest × {e} B ({s.dtype})"
           if s.eight_bit else f"{z.params:,} params × {e} B ({s.dtype})")
    if reference_copies(s, z.trainable - z.adapter):
        why += (f"; + {z.trainable - z.adapter:,} × {e} B: the modules_to_save tables as they started, which "
                f"rl: {s.rl}'s reference reads")
    return why


def _adapter_formula(spec: ModelSpec, s: Settings, adapters: act.Adapters, adapter: int) -> str:
    n_layers = sum(1 for w in adapters if w)
    per = "(r·(in+out) + out)" if s.use_dora else "r·(in+out)"
    outside = sum(outside_blocks(spec, s)[0])
    extra = f" + {outside:,} on the embeddings/head" if outside else ""
    if n_layers == spec.layers and len({tuple(w.items()) for w in adapters}) == 1 and not s.rank_pattern:
        return (f"{adapter:,} = {spec.layers} layers × Σ {per} over {len(adapters[0])} targets{extra} "
                "× 4 B (fp32)")
    n_modules = sum(len(w) for w in adapters)
    return (f"{adapter:,} = Σ {per} over {n_modules} adapted layers in {n_layers} of {spec.layers} "
            f"blocks{extra} × 4 B (fp32)")
