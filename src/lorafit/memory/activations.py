"""Saved activations per decoder layer, tensor by tensor, in bytes per token.

Derived from what autograd keeps for the HF modules lorafit trains (checked with saved-tensor hooks):

* RMSNorm, Llama-style (Llama/Qwen2/Mistral/Phi-3; ``lorafit.kernels.rms_norm``): the input by reference
  (e B/elt) and ``rstd`` (4 B/token), trainable scale or not. Gemma's norm (left as transformers has it):
  ``x.float()`` saved by ``pow`` and ``mul`` (4 B/elt), ``rsqrt`` (4 B/token) and, with a trainable scale,
  the fp32 normalised tensor. Nothing is saved when no gradient flows into the norm (layer 0 of a LoRA
  model: the embedding is frozen).
* Projections: a frozen linear saves nothing; a trainable one saves its input; a LoRA layer saves its input
  by reference (one copy per group of layers reading the same tensor), ``x·Aᵀ`` (r per token) and, with
  dropout, nothing more (an 8-byte seed: ``lorafit.kernels.dropout`` recomputes the mask in backward). A DoRA
  layer (``lorafit.kernels.dora``) also saves ``z = x'Wᵀ + s·x'AᵀBᵀ`` (out per token, for the magnitude's
  gradient) and its row norms (out fp32 values per layer), and runs alone: its input is always saved, a DoRA
  ``down_proj`` included (the fused gated MLP leaves it alone).
* Rotary: ``cos``/``sin`` (seq × head_dim, shared by all layers); ``q_embed``, ``k_embed`` are new tensors.
* SDPA (CPU flash / CUDA flash kernels): saves q, k, v, the output (which is also ``o_proj``'s input: the
  transpose back is free) and a fp32 log-sum-exp per head and token.
* Gated MLP (``lorafit.kernels.gated_mlp``): gate and up (act(gate) is recomputed in backward); the product
  (down_proj's input) only when down_proj is trainable in full (a LoRA down_proj recomputes it for ``dA``).
  Phi-3's fused gate_up MLP is left as transformers has it: it keeps act(gate) and the product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from lorafit.memory.spec import ModelSpec
from lorafit.options import loss_chunk_tokens
from lorafit.targets import ALL_LINEAR, name_matches, selected

# Per decoder block, bottom to top: the linear layers LoRA wraps there (path inside the block -> rank).
# Full fine-tuning: no wrapped layers, every block trained (``s.method == "full"``).
Adapters = list[dict[str, int]]


@dataclass
class Activations:
    total: int  # bytes saved for backward at the end of forward, all layers and the model-level tensors
    per_layer: int  # bytes of the largest decoder layer without checkpointing
    recompute: int  # with checkpointing: one layer's activations recomputed in backward (else 0)
    resident_end: int  # still saved when backward reaches the lowest layer it runs through
    formula: str


class Block(NamedTuple):
    """What one decoder block saves for backward."""

    per_token: int  # bytes per token
    grad_out: bool  # a gradient flows out of it, into the block above
    attention: bool  # its attention saves for backward (and with it the shared rotary cos/sin, packing mask)


@dataclass
class LossBuffers:
    total: int
    head_grad: int  # fp32 gradient of the head the chunked loss builds during forward (full fine-tuning)
    formula: str


@dataclass
class Temporaries:
    total: int
    formula: str


def rms_norm_bytes(spec, e: int, full: bool) -> int:
    """Bytes per token one RMSNorm saves (see the module docstring)."""
    d = spec.hidden
    if spec.family.startswith("gemma"):
        return 4 * d + 4 + (4 * d if full else 0)
    return e * d + 4


def lora_saved(spec: ModelSpec, s, wrapped: dict[str, int], names) -> int:
    """Bytes per token the LoRA layers ``names`` (those wrapped) save besides their input: ``x·Aᵀ`` (r values in
    the matmuls' dtype; a dropout mask is not kept) and, for DoRA, ``z`` (out values, the same dtype)."""
    outs = {n: o for n, _, o, _ in spec.linear_layers()}
    return sum((wrapped[n] + (outs[n] if s.use_dora else 0)) * s.compute_bytes for n in names if n in wrapped)


def _block(spec: ModelSpec, s, wrapped: dict[str, int], rg: bool) -> Block:
    """What one decoder block saves; ``rg``: does a gradient flow into the block's input."""
    e, d, q, kv, inter = s.bytes, spec.hidden, spec.q_dim, spec.kv_dim, spec.intermediate
    full = s.method == "full"
    if spec.family == "gpt2":
        return _gpt2_block(spec, s, wrapped, rg)

    def norm(rg_in: bool) -> int:
        if not (rg_in or full):
            return 0
        return rms_norm_bytes(spec, e, full)

    def xa(names) -> int:
        return lora_saved(spec, s, wrapped, names)

    groups: dict[str, list[str]] = {}
    for n, _, _, g in spec.linear_layers():
        groups.setdefault(g, []).append(n)
    total = norm(rg)
    # attention input group
    attn_in = groups["attn_in"]
    if full or any(n in wrapped for n in attn_in):
        total += e * d + xa(attn_in)
    attn_rg = rg or full or any(n in wrapped for n in attn_in)
    if attn_rg:
        if spec.family == "phi3":  # v is a view of the fused qkv output: the whole output stays alive
            total += e * (q + kv) + e * (q + 2 * kv)
        else:
            total += e * (q + 2 * kv)
        total += e * q + 4 * spec.heads  # output (= o_proj input) + log-sum-exp
    o = groups["attn_out"]
    if not attn_rg and any(n in wrapped for n in o):
        total += e * q
    total += xa(o)
    out_rg = attn_rg or any(n in wrapped for n in o)
    if spec.family == "gemma2":
        total += norm(out_rg)  # post_attention_layernorm on the attention output
    h_rg = rg or out_rg
    total += norm(h_rg)
    mlp_in = groups["mlp_in"]
    if full or any(n in wrapped for n in mlp_in):
        total += e * d + xa(mlp_in)
    mlp_rg = h_rg or full or any(n in wrapped for n in mlp_in)
    if mlp_rg:
        # gate and up; lorafit.kernels.gated_mlp recomputes act(gate) in backward (Phi-3's fused MLP keeps it)
        total += (3 if spec.family == "phi3" else 2) * e * inter
    down = groups["mlp_out"]
    if full or any(n in wrapped for n in down):
        # the product (down_proj's input); a LoRA down_proj in lorafit's gated MLP recomputes it in backward
        saves_product = full or spec.family == "phi3" or not s.lean
        total += (e * inter if saves_product else 0) + xa(down)
    if spec.family == "gemma2":
        total += norm(mlp_rg or any(n in wrapped for n in down))
    return Block(total, h_rg or mlp_rg or any(n in wrapped for n in down), attn_rg)


def _gpt2_block(spec: ModelSpec, s, wrapped: dict[str, int], rg: bool) -> Block:
    """GPT-2: LayerNorm saves input + mean + rstd; c_attn output holds q, k, v (views); tanh-GELU in 6 ops."""
    e, d, inter = s.bytes, spec.hidden, spec.intermediate
    full = s.method == "full"

    def xa(name: str) -> int:  # x·Aᵀ (and DoRA's z) per LoRA layer
        return lora_saved(spec, s, wrapped, [name])

    ln = e * d + 8
    total = ln if rg or full else 0
    c_attn = full or "attn.c_attn" in wrapped
    if c_attn:
        total += e * d + xa("attn.c_attn")
    attn_rg = rg or c_attn
    if attn_rg:
        total += e * 3 * d + e * d + 4 * spec.heads
    c_proj = full or "attn.c_proj" in wrapped
    if c_proj and not attn_rg:
        total += e * d  # c_proj's input (the attention output), counted above when attention saves it
    total += xa("attn.c_proj")
    h_rg = attn_rg or c_proj
    if h_rg:
        total += ln  # ln_2: the residual requires grad from here on
    c_fc = full or "mlp.c_fc" in wrapped
    if c_fc:
        total += e * d + xa("mlp.c_fc")
    mlp_rg = h_rg or c_fc
    if mlp_rg:
        total += GPT2_GELU_SAVED * e * inter
    down = full or "mlp.c_proj" in wrapped
    if down:
        total += e * inter + xa("mlp.c_proj")
    return Block(total, mlp_rg or down, attn_rg)


# NewGELU = 0.5·x·(1 + tanh(√(2/π)(x + 0.044715 x³))): saves x, tanh output, 0.5·x and 1 + tanh.
GPT2_GELU_SAVED = 4


def blocks(spec: ModelSpec, s, adapters: Adapters) -> list[Block]:
    """What each decoder block saves, bottom to top. In LoRA no gradient flows into the blocks below the
    lowest adapter when the embedding is frozen: they save nothing. A trained embedding (a LoRA target or in
    ``modules_to_save``) needs the gradient all the way down: every block saves what its input gradient needs."""
    out, rg, seen = [], s.method == "full" or embedding_trained(spec, s), {}
    for wrapped in adapters:
        key = (tuple(sorted(wrapped.items())), rg)
        if key not in seen:  # blocks alike (most of them) are computed once
            seen[key] = _block(spec, s, wrapped, rg)
        out.append(seen[key])
        rg = seen[key].grad_out
    return out


def layer_bytes(spec: ModelSpec, s, adapters: Adapters) -> list[int]:
    """Bytes per token each decoder block saves, bottom to top."""
    return [b.per_token for b in blocks(spec, s, adapters)]


def activations(spec: ModelSpec, s, adapters: Adapters) -> Activations:
    e, d, n_tok, L = s.bytes, spec.hidden, s.tokens, spec.layers
    layers = blocks(spec, s, adapters)
    per_token = [b.per_token for b in layers]
    active = [b for b in per_token if b]  # the blocks backward runs through
    per_layer = max(per_token) * n_tok
    lowest = active[0] * n_tok if active else 0
    # Model level: rotary cos/sin (batch 1 × seq × head_dim, shared, kept by any attention that saves), the
    # final norm.
    attention = any(b.attention for b in layers)
    rotary = 2 * s.seq_len * spec.head_dim * e if attention and spec.family != "gpt2" else 0
    below = bool(active) or embedding_trained(spec, s)  # whether the final hidden states need a gradient
    if not below:
        final = 0  # e.g. only lm_head adapted: nothing under the head is trained
    elif spec.family == "gpt2":
        final = (e * d + 8) * n_tok
    else:
        final = rms_norm_bytes(spec, e, s.method == "full") * n_tok
    outside = outside_saved(spec, s, below)
    if s.packing and attention:  # block-causal mask built from the position restarts: bool (B × 1 × T × T)
        rotary += s.micro_batch * s.seq_len * s.seq_len
    if s.gradient_checkpointing:
        # A checkpoint keeps its block's input while the block holds anything for backward: not below the
        # lowest adapter.
        n_in = len(active)
        # offload: the inputs wait in host memory (transformers' save_on_cpu); one is back for its recompute
        offloaded = s.offload_checkpoints and s.device == "cuda"
        kept = 1 if offloaded else n_in
        # An 8-bit base: bitsandbytes' int8 matmul keeps its input as a ctx attribute, out of checkpointing's
        # reach, so each block's linear inputs (one per input group) stay until backward passes (measured)
        int8_held = n_tok * e * sum(dict((g, i) for _, i, _, g in spec.linear_layers()).values()) \
            if getattr(s, "eight_bit", False) else 0
        total = kept * n_tok * d * e + n_in * int8_held + rotary + final + outside
        where = f"{n_in} layer inputs in host memory, one on the device" if offloaded else f"{n_in} layer inputs"
        held = f" + {n_in} × the int8 layers' inputs {int8_held / 2**20:.1f} MiB" if int8_held else ""
        return Activations(total, per_layer, per_layer, rotary + n_tok * d * e + int8_held,
                           f"checkpointing: {where} × {n_tok} tokens × {d} × {e} B{held} "
                           f"+ final norm + rotary; one layer ({per_layer / 2**20:.1f} MiB) recomputed in backward")
    # every LoRA layer with dropout keeps its mask's seed (two int32); a DoRA layer its fp32 row norms
    n_lora = sum(len(w) for w in adapters)
    seeds = 8 * n_lora if s.method == "lora" and s.dropout > 0 else 0
    total = sum(per_token) * n_tok + rotary + final + seeds + dora_norms(spec, s, adapters) + outside
    formula = _formula(per_token, n_tok, L, per_layer)
    if outside:
        formula += f" + embeddings/head {outside / 2**20:.1f} MiB"
    return Activations(total, per_layer, 0, rotary + lowest, formula)


def outside_saved(spec: ModelSpec, s, below: bool) -> int:
    """What the token embeddings and the output head save for backward when they are trained (LoRA targets or
    ``modules_to_save``; full fine-tuning's head gradient is the loss's ``head_grad``).

    A trained embedding: the int64 token ids (``F.embedding``'s backward); a LoRA one also its ``ids → A``
    lookup (tokens × r, fp32) for B's gradient. A LoRA head (``lorafit.train.loss``, merge-free): the dropped-out
    hidden rows in fp32 for A's gradient, the dropout mask (in the compute dtype, as torch keeps it on CPU) when a gradient flows below, and the chunked
    loss's fp32 ``du`` (rows × r) and ``dB`` (vocab × r). Measured with saved-tensor hooks
    (``tests/test_estimate_targets.py``).
    """
    if s.method != "lora":
        return 0
    from lorafit.memory.estimate import outside_targets  # the one place the targets are matched

    d, V, n_tok = spec.hidden, spec.vocab, s.tokens
    n_tr = s.micro_batch * (s.seq_len - 1)
    total = n_tok * 8 if embedding_trained(spec, s) else 0
    for path, r in outside_targets(spec, s):
        if path == spec.embedding_path:
            total += n_tok * r * 4
        else:
            mask = n_tr * d * s.bytes if s.dropout > 0 and below else 0  # F.dropout keeps it in the input dtype
            total += n_tr * d * 4 + mask + n_tr * r * 4 + V * r * 4
    return total


def dora_norms(spec: ModelSpec, s, adapters: Adapters) -> int:
    """Bytes of the row norms every DoRA layer keeps for backward (out fp32 values each)."""
    if not s.use_dora or s.method != "lora":
        return 0
    outs = {n: o for n, _, o, _ in spec.linear_layers()}
    return sum(4 * outs[n] for w in adapters for n in w)


def _formula(per_token: list[int], n_tok: int, L: int, per_layer: int) -> str:
    first, rest = per_token[0], per_token[-1]
    if len(set(per_token[1:])) <= 1:  # every block alike but (maybe) the first
        return (f"{L} layers × {n_tok} tokens × {rest} B/token ({per_layer / 2**20:.1f} MiB per layer"
                + (f"; layer 0 {first} B/token" if first != rest else "") + ") + final norm + rotary")
    active = [b for b in per_token if b]
    return (f"{len(active)} of {L} layers save tensors: {n_tok} tokens × {min(active)}–{max(active)} B/token "
            f"(largest {per_layer / 2**20:.1f} MiB) + final norm + rotary")


def chunk_tokens(spec: ModelSpec, s) -> int:
    return s.loss_chunk_tokens or loss_chunk_tokens(spec.vocab)


def loss_buffers(spec: ModelSpec, s) -> LossBuffers:
    """Memory of the loss at the end of forward, beyond the saved activations.

    Chunked (``lorafit.kernels.loss``): the final hidden states, their shifted copy (batch > 1) and the
    gathered trained rows, the hidden-state gradient computed in forward, and one chunk's fp32 logits (+ the
    compute-dtype matmul output when that is not fp32; + ``tanh`` output with a soft-cap). Full fine-tuning
    adds the head's fp32 gradient. Measured on one call of ``LinearCrossEntropy.forward`` with a dispatch-mode
    tracker: 4.0 B per chunk element in fp32, 6.0 in bf16, whatever the number of chunks.
    HF: the full logits in the compute dtype, their fp32 upcast, log-softmax output and its gradient.
    """
    e, d, V, B, T = s.bytes, spec.hidden, spec.vocab, s.micro_batch, s.seq_len
    n_tok, n_tr = B * T, B * (T - 1)
    head_grad = V * d * 4 if head_trained(s) and not head_grad_in_backward(s) else 0
    if s.loss == "hf":
        per = e + 12 if e != 4 else 12
        total = n_tok * V * per
        return LossBuffers(total, 0, f"plain HF loss: {n_tok} tokens × {V} vocab × {per} B (logits, fp32 upcast, "
                                     "log-softmax and its gradient)")
    c = min(chunk_tokens(spec, s), n_tr)
    # One chunk's buffers, reused by every chunk. Per logit: the fp32 logits (4 B) + the compute-dtype buffer the
    # matmuls read and write (e B, when they do not run in fp32); with a final soft-cap, ``t = tanh`` (4 B) kept
    # for 1 − t². Frozen matmuls on fp32 copies (``lorafit.kernels.matmul``): the head's fp32 copy, made once
    # for all chunks, and a chunk's fp32 rows and hidden-state gradient.
    low = e != 4 and not s.upcast_head(V * d)
    per = 4 + (e if low else 0) + (4 if spec.final_logit_softcap else 0)
    chunk = c * V * per
    upcast = V * d * 4 + 2 * c * d * 4 if s.upcast_head(V * d) else 0
    hidden = n_tok * d * e + (n_tr * d * e if B > 1 else 0) + 2 * n_tr * d * e
    total = hidden + chunk + upcast
    why = ("fp32 logits" + (f" + {s.dtype} matmul buffer" if low else "")
           + (" + tanh output (soft-cap)" if spec.final_logit_softcap else ""))
    return LossBuffers(total, head_grad,
                       f"hidden states and copies {hidden / 2**20:.1f} MiB + one chunk of {c} tokens × {V} vocab × "
                       f"{per} B ({why})" + (f" + fp32 copy of the head {upcast / 2**20:.1f} MiB" if upcast else "")
                       + (" + head gradient fp32 (V × d × 4 B)" if head_grad else ""))


def loss_backward(spec: ModelSpec, s) -> int:
    """Transient memory of the chunked loss's backward (``LinearCrossEntropy.backward``), the first node backward
    runs, while every activation is still saved: the saved hidden-state gradient and its product with the
    incoming gradient; for full fine-tuning, the saved fp32 head gradient (V × d × 4 B), its product with the
    incoming gradient (a second V × d × 4 B) and, for a bf16/fp16 head, autograd's cast of that product to the
    weight's dtype before it is accumulated (V × d × e) — all three live together. The plain HF loss keeps no
    such buffers (its backward is counted in :func:`loss_buffers`)."""
    if s.loss == "hf":
        return 0
    e, d, V = s.bytes, spec.hidden, spec.vocab
    n_tr = s.micro_batch * (s.seq_len - 1)
    cast = e if e != 4 else 0
    head = V * d * (4 + 4 + cast) if head_trained(s) else 0
    if head_grad_in_backward(s):  # the fp32 gradient with one chunk's buffers, then its cast to the weight's dtype
        head = V * d * 4 + max(min(chunk_tokens(spec, s), n_tr) * V * (4 + cast), V * d * cast)
    return 2 * n_tr * d * e + head


def head_grad_in_backward(s) -> bool:
    """``rl: dpo`` / ``kto`` with a trained head: the log-probabilities are per-sequence sums, whose head gradient
    the chunked loss makes in backward, recomputing the logits (``lorafit.kernels.loss``), not in forward.
    ORPO's nll call is a plain sum and makes it in forward, as supervised training does."""
    return head_trained(s) and getattr(s, "rl", None) in ("dpo", "kto")


def embedding_trained(spec: ModelSpec, s) -> bool:
    """Whether the token embeddings get a gradient: full fine-tuning, or LoRA with them as a target (named or by
    a regex; never by all-linear) or in ``modules_to_save``."""
    if s.method == "full":
        return True
    path, names = spec.embedding_path, getattr(s, "modules_to_save", None) or []
    targets = getattr(s, "targets", ALL_LINEAR)
    return (s.method == "lora" and (bool(names) and name_matches(path, names)
            or targets != ALL_LINEAR and selected(path, targets, getattr(s, "layers_to_transform", None))))


def head_trained(s) -> bool:
    """Whether the output head's weight itself is trained (full fine-tuning, or LoRA with lm_head in
    ``modules_to_save``): then the chunked loss builds its fp32 gradient in forward."""
    names = getattr(s, "modules_to_save", None) or []
    return s.method == "full" or (s.method == "lora" and any(n == "lm_head" or n.endswith(".lm_head") for n in names))


def backward_temporaries(spec: ModelSpec, s, adapters: Adapters) -> Temporaries:
    """Transient gradients while backward runs through a decoder layer (calibrated, see measure): the largest
    over the layers it runs through, the top one when all are alike."""
    e, d, n_tok = s.bytes, spec.hidden, s.tokens
    per_token = layer_bytes(spec, s, adapters)
    mlp, why = max((_mlp_temporaries(spec, s, set(w)) for w, b in zip(adapters, per_token, strict=True) if b),
                   default=(0, "nothing (no block runs backward)"))
    total = int(mlp * n_tok * spec.intermediate + BW_HIDDEN * n_tok * d * e)
    # Frozen matmuls on fp32 copies (lorafit.kernels.matmul): the weight being multiplied has an fp32 copy
    # (one at a time; the largest counts).
    shapes = {n: i * o for n, i, o, _ in spec.linear_layers()}
    wrapped = {n for w in adapters for n in w}
    weight_copy = 4 * max(shapes[n] for n in wrapped) if s.upcast and wrapped else 0
    # A 4-bit base: the layer's weight dequantized for its backward (lorafit.kernels.nf4), one at a time; an 8-bit
    # base the same (bitsandbytes' int8 backward dequantizes CB · SCB for x's gradient)
    quantized = getattr(s, "four_bit", None) or getattr(s, "eight_bit", False)
    dequant = e * max(shapes.values()) if quantized else 0
    act = activations(spec, s, adapters)
    masks, masks_why = eager_dropout_temporaries(spec, s, adapters)
    total += act.recompute + weight_copy + dequant + masks
    copy = f" + fp32 copy of a weight {weight_copy / 2**20:.1f} MiB" if weight_copy else ""
    copy += f" + a dequantized weight {dequant / 2**20:.1f} MiB" if dequant else ""
    return Temporaries(total, f"tokens × intermediate × {why} + {BW_HIDDEN} × tokens × hidden × {e} B{copy}"
                              + (" + one recomputed layer" if act.recompute else "")
                              + (f" + {masks_why}" if masks else ""))


def eager_dropout_temporaries(spec: ModelSpec, s, adapters: Adapters) -> tuple[int, str]:
    """Bytes of the dropout masks and masked products a LoRA backward makes with compiling off, and their formula.

    With kernels compiled, the mask is a hash computed inside one fused kernel that writes only its outputs
    (counted with the MLP and hidden-state temporaries). Eager (``RuntimeOptions.compile`` off), each
    ``lorafit.kernels.dropout`` call materialises its full-size drawn mask and the masked product before
    the sum: for a layer alone (``dropped_and_add_dropped``), mask + ``low · keep``, 2 (tokens × in); for a group
    of n layers reading one input (``dropped_each_and_add``), the n masks together plus the product and the
    running sum, n + 2. The largest over the wrapped layers' input groups counts (measured with MemTracker)."""
    if s.method == "full" or s.dropout <= 0 or s.runtime.compile:
        return 0, ""
    wrapped = {n for w in adapters for n in w}
    groups: dict[str, tuple[int, int]] = {}  # input group -> (wrapped layers in it, input width)
    for n, i, _, g in spec.linear_layers():
        if n in wrapped:
            k, _ = groups.get(g, (0, i))
            groups[g] = (k + 1, i)
    if not groups:
        return 0, ""
    k, width = max(groups.values(), key=lambda kw: (kw[0] + 2 if kw[0] > 1 else 2) * kw[1])
    n = k + 2 if k > 1 else 2
    c = s.compute_bytes
    return n * s.tokens * width * c, f"eager dropout masks {n} × tokens × {width} × {c} B"


def _mlp_temporaries(spec: ModelSpec, s, wrapped: set[str]) -> tuple[int, str]:
    """Bytes per (token × intermediate) of the MLP's backward transients in one block, and their formula.
    Frozen matmuls on fp32 copies make them fp32 (same count, measured)."""
    e, c = s.bytes, s.compute_bytes
    down_lora = any(n.endswith(("down_proj", "mlp.c_proj")) for n in wrapped)
    dropout = s.method == "lora" and s.dropout > 0
    if s.method == "lora" and down_lora and spec.family == "llama" and s.runtime.compile and s.lean:
        # SiLU MLP, LoRA down_proj (lorafit.kernels.gated_mlp): one fused kernel reads down's input gradient
        # (``base``, and the masked LoRA part ``low``) and writes drop(h), grad gate, grad up.
        return (3 if dropout else 2) * c + 2 * e, f"({3 if dropout else 2} × {c} + 2 × {e}) B"
    k = BW_MLP_DROPOUT if (dropout and down_lora) else BW_MLP
    return k * c, f"{k} × {c} B"


def embedding_backward(spec: ModelSpec, s) -> int:
    """Full fine-tuning: memory beyond all gradients when the dense (vocab × hidden) embedding gradient is
    accumulated. Tied to the head, the weight already holds the head's gradient from the loss: the dense
    gradient and the sum accumulating makes as a new tensor, two (vocab × hidden) at the end of backward.
    Untied, the embedding has no gradient yet and autograd keeps the dense one as ``.grad`` (no copy): nothing
    beyond the gradients, which already count it (both measured with MemTracker)."""
    if s.method != "full" or not spec.tied_embeddings:
        return 0
    return 2 * spec.vocab * spec.hidden * s.bytes


# Calibrated against MemTracker peaks (benchmarks/estimate_vs_measured.py).
BW_MLP = 3
BW_MLP_DROPOUT = 5
BW_HIDDEN = 3


def saved_for_backward(spec: ModelSpec, s, adapters: Adapters) -> int:
    """Bytes autograd holds for backward at the end of forward + loss, every position trained, no checkpointing.

    The decoder's saved activations (:func:`activations`), the hidden-state gradient the chunked loss computes
    in forward and saves (trained rows × hidden × dtype) and the int64 index of the trained rows. Parameters
    saved by reference are not counted. ``tests/test_memory.py`` checks this against saved-tensor hooks, so a
    change in what the LoRA layer, the HF modules or the loss save fails a test until the model follows.
    """
    n_tr = s.micro_batch * (s.seq_len - 1)
    acts = activations(spec, s, adapters)
    below = any(w for w in adapters) or embedding_trained(spec, s)  # else the loss needs no hidden-state gradient
    head = spec.vocab * spec.hidden * 4 if s.method == "lora" and head_trained(s) else 0  # lm_head's fp32 gradient
    return acts.total + (n_tr * spec.hidden * s.bytes + n_tr * 8 if below else 0) + head
