"""The analytic memory model of one ``lorafit train`` step: bytes per component, each with its formula.

What is modelled is lorafit's own step (``lorafit.train.trainer.train_step``): the base in ``dtype``; for LoRA,
fp32 adapter weights, fp32 gradients and fp32 AdamW states, and :class:`lorafit.lora.LoraLinearFunction`'s
saved tensors (the layer input by reference, ``x·Aᵀ``, a dropout seed); the chunked loss of
``lorafit.train.loss`` (no full logits); torch's AdamW (two states in the parameter's dtype).

Activations are counted from first principles per decoder layer, tensor by tensor, as the HF modules save
them for backward (see :mod:`lorafit.memory.activations`). The step's peak is the largest of four moments:

* **loss** — end of forward: all saved activations + the loss buffers (hidden-state copies, the gradient
  the chunked loss computes in forward, one chunk of fp32 logits);
* **backward start** — all activations + the first layer's backward temporaries;
* **backward end** — all gradients + the last layer's backward temporaries (matters for full fine-tuning);
* **optimizer step** — all gradients + optimizer states + the update's temporaries.

Optimizer states exist from the first step on, so they are in all four moments of every later step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from lorafit.errors import LorafitError
from lorafit.memory import activations as act
from lorafit.memory.spec import ModelSpec

GiB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
               "float16": "float16", "fp16": "float16"}
OPTIMIZERS = {"adamw": "adamw", "adamw_torch": "adamw", "adamw_hf": "adamw", "adamw_torch_fused": "adamw_fused",
              "adamw_fused": "adamw_fused", "sgd": "sgd"}
# Outside the allocator on a GPU: CUDA context, cuBLAS/cuDNN workspaces (measured 0.4-0.6 GiB on recent cards).
CUDA_CONTEXT_BYTES = int(0.5 * GiB)
# Allocator slack between reserved and allocated memory at the peak (caching allocator, block rounding).
ALLOCATOR_FRACTION = 0.05


@dataclass
class Settings:
    """What a training run chooses. Defaults follow ``lorafit train``'s config defaults."""

    method: str = "lora"  # "lora" | "full"
    dtype: str = "bfloat16"
    micro_batch: int = 1
    seq_len: int = 2048
    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] | str = "all-linear"
    optimizer: str = "adamw"  # adamw | adamw_fused | sgd
    gradient_checkpointing: bool = False
    packing: bool = False
    loss: str = "chunked"  # "chunked" (lorafit) | "hf" (plain transformers loss: full logits)
    loss_chunk_tokens: int | None = None  # None: lorafit's default for the vocabulary
    device: str = "cuda"  # "cuda" adds context/allocator overhead; "cpu" adds none
    # dtype the frozen LoRA/loss matmuls run in; None: what lorafit.matmul picks (on "cpu": for this machine's CPU).
    # Resolved on use (see effective_matmul_dtype), so dataclasses.replace() with another method/device re-resolves.
    matmul_dtype: str | None = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        self.method = {"none": "full", "": "full", "full": "full", "lora": "lora"}.get(str(self.method).lower(), self.method)
        if self.method not in ("lora", "full"):
            raise LorafitError(f"method: got {self.method!r}, use lora or full")
        dt = DTYPE_NAMES.get(str(self.dtype).lower())
        if dt is None:
            raise LorafitError(f"dtype: got {self.dtype!r}, use bfloat16 or float32")
        self.dtype = dt
        opt = OPTIMIZERS.get(str(self.optimizer).lower())
        if opt is None:
            raise LorafitError(f"optimizer: got {self.optimizer!r}, use one of: {', '.join(OPTIMIZERS)}")
        self.optimizer = opt
        for name in ("micro_batch", "seq_len", "r"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise LorafitError(f"{name.replace('_', '-')}: got {v!r}, must be an integer > 0")
        if self.seq_len < 2:
            raise LorafitError(f"seq-len: got {self.seq_len}, must be at least 2 (one token predicts the next)")
        if not 0 <= float(self.dropout) < 1:
            raise LorafitError(f"lora dropout: got {self.dropout!r}, must be in [0, 1)")
        if self.loss not in ("chunked", "hf"):
            raise LorafitError(f"loss: got {self.loss!r}, use chunked or hf")
        if self.loss_chunk_tokens is not None and self.loss_chunk_tokens <= 0:
            raise LorafitError(f"loss chunk tokens: got {self.loss_chunk_tokens}, must be > 0")
        if self.device not in ("cuda", "cpu"):
            raise LorafitError(f"device: got {self.device!r}, use cuda or cpu")
        if not self.targets:
            raise LorafitError("lora targets: empty; give module names like q_proj,v_proj or all-linear")
        if self.matmul_dtype is not None:
            dt = DTYPE_NAMES.get(str(self.matmul_dtype).lower())
            if dt not in (self.dtype, "float32") or (dt == "float32" and self.dtype == "float16"):
                ok = f"{self.dtype} or float32" if self.dtype == "bfloat16" else self.dtype
                raise LorafitError(f"matmul dtype: got {self.matmul_dtype!r}, use {ok}")
            self.matmul_dtype = dt

    @property
    def bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def effective_matmul_dtype(self) -> str:
        """The dtype the frozen matmuls run in: a trained (full fine-tuning) base is never upcast."""
        if self.method != "lora":
            return self.dtype
        return self.matmul_dtype or _matmul_dtype(self.dtype, self.device, self.tokens)

    @property
    def upcast(self) -> bool:
        """Whether the frozen matmuls run on fp32 copies of the bf16/fp16 tensors (see ``lorafit.matmul``)."""
        return self.effective_matmul_dtype != self.dtype

    def upcast_head(self, numel: int) -> bool:
        """Whether the chunked loss runs on an fp32 copy of a (frozen) head of ``numel`` elements."""
        from lorafit import matmul

        return self.upcast and matmul.head_copy_allowed(numel)  # the rule training uses

    @property
    def compute_bytes(self) -> int:
        return DTYPE_BYTES[self.effective_matmul_dtype]

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len

    def to_dict(self) -> dict:
        return asdict(self)


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


def lora_targets(spec: ModelSpec, targets: list[str] | str) -> list[tuple[str, int, int, str]]:
    """The linear layers of one block that ``targets`` selects (same matching rule as lorafit.lora)."""
    layers = spec.linear_layers()
    if targets == "all-linear":
        return layers
    if isinstance(targets, str):  # a regex over module paths, as lorafit.lora matches it
        import re

        hit = [ly for ly in layers if re.search(targets, ly[0])]
        if not hit:
            raise LorafitError(f"lora target regex {targets!r} matches no linear layer of {spec.name}; "
                               f"this model has: {', '.join(spec.module_names())}")
        return hit
    chosen = []
    for t in targets:
        hit = [ly for ly in layers if ly[0] == t or ly[0].endswith("." + t) or ly[0].split(".")[-1] == t]
        if not hit:
            raise LorafitError(f"lora target {t!r} matches no linear layer of {spec.name}; "
                               f"this model has: {', '.join(spec.module_names())}")
        chosen += [h for h in hit if h not in chosen]
    return chosen


def _matmul_dtype(dtype: str, device: str, tokens: int) -> str:
    import torch

    from lorafit import matmul

    return str(matmul.compute_dtype(getattr(torch, dtype), device, rows=tokens)).removeprefix("torch.")


def estimate(spec: ModelSpec, settings: Settings) -> Estimate:
    s, e = settings, settings.bytes
    lora = s.method == "lora"
    P = spec.total_params()
    targets = lora_targets(spec, s.targets) if lora else []
    adapter = spec.layers * sum(s.r * (i + o) for _, i, o, _ in targets)
    trainable = adapter if lora else P
    w_bytes = P * e
    a_bytes = adapter * 4
    # Gradients: LoRA fp32 (adapter dtype); full fine-tuning in the parameter dtype.
    g_bytes = adapter * 4 if lora else P * e
    state_elt = 4 if lora else e
    n_states = {"adamw": 2, "adamw_fused": 2, "sgd": 0}[s.optimizer]
    o_bytes = n_states * trainable * state_elt

    acts = act.activations(spec, s, targets)
    loss = act.loss_buffers(spec, s)
    bw_first = act.backward_temporaries(spec, s, targets)
    # No temporaries in optimizer.step(): the trainer's AdamW is fused on CUDA and CPU (``train.optim``) and
    # updates in place (torch's default, foreach, would make one as large as all trainable parameters); SGD none.
    opt_tmp, opt_tmp_formula = 0, "no temporaries (fused AdamW / SGD)"

    persistent = w_bytes + a_bytes + o_bytes
    head_grad = loss.head_grad  # full FT: the head/embedding gradient the chunked loss builds in forward
    moments = {
        "loss": persistent + acts.total + loss.total + head_grad,
        "backward start": persistent + acts.total + bw_first.total + head_grad,
        "backward end": persistent + g_bytes + act.embedding_backward(spec, s) + acts.resident_end,
        "optimizer step": persistent + g_bytes + opt_tmp,
    }
    moment = max(moments, key=moments.get)
    peak_alloc = moments[moment]
    grads_at = {"loss": head_grad, "backward start": head_grad}.get(moment, g_bytes)
    acts_at = {"loss": acts.total, "backward start": acts.total, "backward end": acts.resident_end}.get(moment, 0)
    loss_at = loss.total if moment == "loss" else 0
    temp_at = peak_alloc - persistent - grads_at - acts_at - loss_at
    overhead = 0
    overhead_formula = "CPU: none counted (tensor memory only)"
    if s.device == "cuda":
        overhead = CUDA_CONTEXT_BYTES + int(ALLOCATOR_FRACTION * peak_alloc)
        overhead_formula = (f"CUDA context and library workspaces {CUDA_CONTEXT_BYTES / GiB:.2f} GiB + allocator "
                            f"slack {ALLOCATOR_FRACTION:.0%} of the allocated peak")
    name = "trainable weights (LoRA A, B)" if lora else "trainable weights"
    comps = [
        Component("weights", w_bytes, w_bytes, f"{P:,} params × {e} B ({s.dtype})"),
        Component(name, a_bytes if lora else w_bytes, a_bytes,
                  (f"{adapter:,} = {spec.layers} layers × Σ r·(in+out) over {len(targets)} targets × 4 B (fp32)"
                   if lora else "all weights (counted above)")),
        Component("gradients", g_bytes, grads_at,
                  f"{trainable:,} trainable × {4 if lora else e} B" + ("" if grads_at == g_bytes else
                  "; at the peak: the head's fp32 gradient only" if grads_at else
                  "; none at the peak (freed by zero_grad, rebuilt in backward)")),
        Component("optimizer states", o_bytes, o_bytes,
                  f"{n_states} states × {trainable:,} × {state_elt} B" if n_states else "SGD without momentum: none"),
        Component("activations", acts.total, acts_at, acts.formula),
        Component("logits/loss", loss.total, loss_at, loss.formula),
        Component("temporary peak", max(temp_at, 0), temp_at,
                  f"at the {moment}: " + {"loss": "loss chunk buffers (included above)",
                                          "backward start": bw_first.formula,
                                          "backward end": "last layer's backward temporaries + embedding gradient",
                                          "optimizer step": opt_tmp_formula}[moment]),
        Component("framework overhead", overhead, overhead, overhead_formula),
    ]
    return Estimate(spec=spec, settings=s, components=comps, peak_moment=moment, moments=moments,
                    activation_per_layer=acts.per_layer,
                    params={"total": P, "trainable": trainable, "adapter": adapter})
