"""Saved activations per decoder layer, tensor by tensor, in bytes per token.

Derived from what autograd keeps for the HF modules lorafit trains (checked with saved-tensor hooks):

* RMSNorm, Llama-style (Llama/Qwen2/Mistral/Phi-3; ``lorafit.train.rms_norm``): the input by reference
  (e B/elt) and ``rstd`` (4 B/token), trainable scale or not. Gemma's norm (left as transformers has it):
  ``x.float()`` saved by ``pow`` and ``mul`` (4 B/elt), ``rsqrt`` (4 B/token) and, with a trainable scale,
  the fp32 normalised tensor. Nothing is saved when no gradient flows into the norm (layer 0 of a LoRA
  model: the embedding is frozen).
* Projections: a frozen linear saves nothing; a trainable one saves its input; a LoRA layer saves its input
  by reference (one copy per group of layers reading the same tensor), ``x·Aᵀ`` (r per token) and, with
  dropout, nothing more (an 8-byte seed: ``lora.dropout`` recomputes the mask in backward).
* Rotary: ``cos``/``sin`` (seq × head_dim, shared by all layers); ``q_embed``, ``k_embed`` are new tensors.
* SDPA (CPU flash / CUDA flash kernels): saves q, k, v, the output (which is also ``o_proj``'s input: the
  transpose back is free) and a fp32 log-sum-exp per head and token.
* Gated MLP (``lorafit.train.gated_mlp``): gate and up (act(gate) is recomputed in backward); the product
  (down_proj's input) only when down_proj is trainable in full (a LoRA down_proj recomputes it for ``dA``).
  Phi-3's fused gate_up MLP is left as transformers has it: it keeps act(gate) and the product.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorafit.memory.spec import ModelSpec
from lorafit.train import compiled


@dataclass
class Activations:
    total: int  # bytes saved for backward at the end of forward, all layers and the model-level tensors
    per_layer: int  # bytes of one (non-first) decoder layer without checkpointing
    recompute: int  # with checkpointing: one layer's activations recomputed in backward (else 0)
    resident_end: int  # still saved when backward reaches the first layer
    formula: str


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


def _block_per_token(spec: ModelSpec, s, wrapped: set[str], rg: bool) -> tuple[int, bool]:
    """Bytes saved per token by one decoder block; ``rg``: does a gradient flow into the block's input."""
    e, d, q, kv, inter = s.bytes, spec.hidden, spec.q_dim, spec.kv_dim, spec.intermediate
    full = s.method == "full"
    r = s.r
    if spec.family == "gpt2":
        return _gpt2_block(spec, s, wrapped, rg)

    def norm(rg_in: bool) -> int:
        if not (rg_in or full):
            return 0
        return rms_norm_bytes(spec, e, full)

    lin = {n: (i, o, g) for n, i, o, g in spec.linear_layers()}

    def xa(names) -> int:  # x·Aᵀ: r values per token in the matmuls' dtype (a dropout mask is not kept)
        return sum(r * s.compute_bytes for n in names if n in wrapped)

    groups: dict[str, list[str]] = {}
    for n, (_, _, g) in lin.items():
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
        # gate and up; lorafit.train.gated_mlp recomputes act(gate) in backward (Phi-3's fused MLP keeps it)
        total += (3 if spec.family == "phi3" else 2) * e * inter
    down = groups["mlp_out"]
    if full or any(n in wrapped for n in down):
        # the product (down_proj's input); a LoRA down_proj in lorafit's gated MLP recomputes it in backward
        total += (e * inter if full or spec.family == "phi3" else 0) + xa(down)
    if spec.family == "gemma2":
        total += norm(mlp_rg or any(n in wrapped for n in down))
    return total, h_rg or mlp_rg or any(n in wrapped for n in down)


def _gpt2_block(spec: ModelSpec, s, wrapped: set[str], rg: bool) -> tuple[int, bool]:
    """GPT-2: LayerNorm saves input + mean + rstd; c_attn output holds q, k, v (views); tanh-GELU in 6 ops."""
    e, d, inter, r = s.bytes, spec.hidden, spec.intermediate, s.r
    full = s.method == "full"
    w = {n.split(".")[-1] if n != "attn.c_proj" else "c_proj" for n in wrapped}
    xa = r * s.compute_bytes  # x·Aᵀ per LoRA layer (see _block_per_token)

    ln = e * d + 8
    total = ln if rg or full else 0
    if full or "c_attn" in w:
        total += e * d + (xa if "c_attn" in w else 0)
    attn_rg = rg or full or "c_attn" in w
    if attn_rg:
        total += e * 3 * d + e * d + 4 * spec.heads
    total += (xa if "attn.c_proj" in wrapped else 0)
    total += ln  # ln_2: the residual requires grad from here on when anything above was trainable
    if full or "c_fc" in w:
        total += e * d + (xa if "c_fc" in w else 0)
    total += GPT2_GELU_SAVED * e * inter
    if full or "mlp.c_proj" in wrapped:
        total += e * inter + (xa if "mlp.c_proj" in wrapped else 0)
    return total, True


# NewGELU = 0.5·x·(1 + tanh(√(2/π)(x + 0.044715 x³))): saves x, tanh output, 0.5·x and 1 + tanh.
GPT2_GELU_SAVED = 4


def activations(spec: ModelSpec, s, targets: list[tuple]) -> Activations:
    e, d, n_tok, L = s.bytes, spec.hidden, s.tokens, spec.layers
    wrapped = {t[0] for t in targets}
    full = s.method == "full"
    first, rg = _block_per_token(spec, s, wrapped, rg=full)
    rest, _ = _block_per_token(spec, s, wrapped, rg=rg)
    per_layer = rest * n_tok
    per_first = first * n_tok
    # Model level: rotary cos/sin (batch 1 × seq × head_dim, shared), the final norm.
    rotary = 0 if spec.family == "gpt2" else 2 * s.seq_len * spec.head_dim * e
    if spec.family == "gpt2":
        final = (e * d + 8) * n_tok
    else:
        final = rms_norm_bytes(spec, e, full) * n_tok
    if s.packing:  # block-causal mask built from the position restarts: bool (B × 1 × T × T), shared
        rotary += s.micro_batch * s.seq_len * s.seq_len
    if s.gradient_checkpointing:
        layer_inputs = L * n_tok * d * e
        total = layer_inputs + rotary + final
        return Activations(total, per_layer, per_layer, rotary + n_tok * d * e,
                           f"checkpointing: {L} layer inputs × {n_tok} tokens × {d} × {e} B "
                           f"+ final norm + rotary; one layer ({per_layer / 2**20:.1f} MiB) recomputed in backward")
    # every LoRA layer with dropout keeps its mask's seed (two int32)
    seeds = 8 * len(targets) * L if s.method == "lora" and s.dropout > 0 else 0
    total = per_first + (L - 1) * per_layer + rotary + final + seeds
    formula = (f"{L} layers × {n_tok} tokens × {rest} B/token ({per_layer / 2**20:.1f} MiB per layer"
               + (f"; layer 0 {first} B/token" if first != rest else "") + ") + final norm + rotary")
    return Activations(total, per_layer, 0, rotary + per_first, formula)


def chunk_tokens(spec: ModelSpec, s) -> int:
    if s.loss_chunk_tokens:
        return s.loss_chunk_tokens
    from lorafit.train.loss import chunk_tokens_for

    return chunk_tokens_for(spec.vocab)


def loss_buffers(spec: ModelSpec, s) -> LossBuffers:
    """Memory of the loss at the end of forward, beyond the saved activations.

    Chunked (``lorafit.train.loss``): the final hidden states, their shifted copy (batch > 1) and the gathered
    trained rows, the hidden-state gradient computed in forward, and one chunk's fp32 logits (+ the compute-dtype
    matmul output when that is not fp32; + ``tanh`` output with a soft-cap). Full fine-tuning adds the head's
    fp32 gradient. Measured on one call of ``LinearCrossEntropy.forward`` with a dispatch-mode tracker: 4.0 B per
    chunk element in fp32, 6.0 in bf16, whatever the number of chunks.
    HF: the full logits in the compute dtype, their fp32 upcast, log-softmax output and its gradient.
    """
    e, d, V, B, T = s.bytes, spec.hidden, spec.vocab, s.micro_batch, s.seq_len
    n_tok, n_tr = B * T, B * (T - 1)
    head_grad = V * d * 4 if s.method == "full" else 0
    if s.loss == "hf":
        per = e + 12 if e != 4 else 12
        total = n_tok * V * per
        return LossBuffers(total, 0, f"plain HF loss: {n_tok} tokens × {V} vocab × {per} B (logits, fp32 upcast, "
                                     "log-softmax and its gradient)")
    c = min(chunk_tokens(spec, s), n_tr)
    # One chunk's buffers, reused by every chunk. Per logit: the fp32 logits (4 B) + the compute-dtype buffer the
    # matmuls read and write (e B, when they do not run in fp32); with a final soft-cap, ``t = tanh`` (4 B) kept
    # for 1 − t². Frozen matmuls on fp32 copies (``lorafit.matmul``): the head's fp32 copy, made once for all
    # chunks, and a chunk's fp32 rows and hidden-state gradient.
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


def backward_temporaries(spec: ModelSpec, s, targets: list[tuple]) -> Temporaries:
    """Transient gradients while backward runs through the last decoder layer (calibrated, see measure)."""
    e, d, inter, n_tok = s.bytes, spec.hidden, spec.intermediate, s.tokens
    wrapped = {t[0] for t in targets}
    down_lora = any(n.endswith(("down_proj", "mlp.c_proj")) for n in wrapped)
    dropout = s.method == "lora" and s.dropout > 0
    # Frozen matmuls on fp32 copies (lorafit.matmul): the MLP's transients are fp32 (same count, measured), and
    # the weight being multiplied has an fp32 copy (one at a time; the largest counts).
    c = s.compute_bytes
    if s.method == "lora" and down_lora and spec.family == "llama" and compiled.enabled():
        # SiLU MLP, LoRA down_proj (lorafit.train.gated_mlp): one fused kernel reads down's input gradient
        # (``base``, and the masked LoRA part ``low``) and writes drop(h), grad gate, grad up.
        mlp, why = (3 if dropout else 2) * c + 2 * e, f"({3 if dropout else 2} × {c} + 2 × {e}) B"
    else:
        k = BW_MLP_DROPOUT if (dropout and down_lora) else BW_MLP
        mlp, why = k * c, f"{k} × {c} B"
    total = int(mlp * n_tok * inter + BW_HIDDEN * n_tok * d * e)
    weight_copy = 4 * max(i * o for _, i, o, _ in targets) if s.upcast and targets else 0
    act = activations(spec, s, targets)
    total += act.recompute + weight_copy
    return Temporaries(total, f"tokens × intermediate × {why} + {BW_HIDDEN} × tokens × hidden × {e} B"
                              + (f" + fp32 copy of a weight {weight_copy / 2**20:.1f} MiB" if weight_copy else "")
                              + (" + one recomputed layer" if act.recompute else ""))


def embedding_backward(spec: ModelSpec, s) -> int:
    """Full fine-tuning: the dense (vocab × hidden) embedding gradient built before it is accumulated. Tied to
    the head, the weight already holds the head's gradient from the loss, and accumulating makes the sum as a
    new tensor: a second (vocab × hidden) at the end of backward (measured with MemTracker)."""
    if s.method != "full":
        return 0
    return (2 if spec.tied_embeddings else 1) * spec.vocab * spec.hidden * s.bytes


# Calibrated against MemTracker peaks (benchmarks/estimate_vs_measured.py).
BW_MLP = 3
BW_MLP_DROPOUT = 5
BW_HIDDEN = 3


def saved_for_backward(spec: ModelSpec, s, targets: list[tuple]) -> int:
    """Bytes autograd holds for backward at the end of forward + loss, every position trained, no checkpointing.

    The decoder's saved activations (:func:`activations`), the hidden-state gradient the chunked loss computes
    in forward and saves (trained rows × hidden × dtype) and the int64 index of the trained rows. Parameters
    saved by reference are not counted. ``tests/test_memory.py`` checks this against saved-tensor hooks, so a
    change in what the LoRA layer, the HF modules or the loss save fails a test until the model follows.
    """
    n_tr = s.micro_batch * (s.seq_len - 1)
    return activations(spec, s, targets).total + n_tr * spec.hidden * s.bytes + n_tr * 8
