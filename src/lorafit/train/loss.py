"""The causal-LM loss of a transformers model, through the chunked linear cross-entropy kernel.

Runs the decoder stack without its head and hands the hidden states of the *trained* positions only to
:class:`lorafit.kernels.loss.LinearCrossEntropy` (prompt tokens masked out of the loss need no logits at all).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorafit._compat import cache_kwarg
from lorafit.kernels.loss import LinearCrossEntropy
from lorafit.options import RuntimeOptions, loss_chunk_tokens

IGNORE_INDEX = -100


def options_of(model: nn.Module) -> RuntimeOptions:
    """The options a model's lean kernels were applied with (``make_trainable``); resolved now for a model that
    has none (a one-off caller: once per call, never per kernel)."""
    handle = getattr(model, "lean_kernels", None)
    return handle.options if handle is not None else RuntimeOptions.resolve()


def logit_softcap(model: nn.Module) -> float | None:
    """The model's final-logit soft-cap (Gemma 2), None without one."""
    return getattr(model.config, "final_logit_softcapping", None) or None


def decoder_stack(model: nn.Module) -> nn.Module:
    """The decoder stack without the head (LlamaModel, GPT2Model, ...): ``base_model``, or ``model.model`` where the
    class names a prefix it does not have (Llama4ForCausalLM's ``language_model``, so ``base_model`` is itself)."""
    body = model.base_model
    return getattr(model, "model", body) if body is model else body


def causal_lm_loss(model: nn.Module, inputs: dict, labels: torch.Tensor, chunk_tokens: int | None = None,
                   options: RuntimeOptions | None = None) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over trained positions, and how many there were.

    ``labels`` are aligned with ``input_ids`` (HF convention, ``-100`` = not trained); position ``t`` predicts
    ``labels[t + 1]``. Returns ``(loss_sum, n_tokens)``; divide by the number of trained tokens of the whole
    accumulated batch, not per micro-batch, so every trained token weighs the same. ``chunk_tokens``: tokens
    per chunk (None: sized to the vocabulary). ``options``: the run's (the trainer passes them; None: see
    :func:`options_of`).
    """
    options = options or options_of(model)
    hidden = hidden_states(model, decoder_stack(model), inputs, options.shared_prefix)  # (B, T, d)
    h, targets, _ = trained_positions(hidden, labels)
    n = int(targets.numel())
    if n == 0:
        return hidden.sum() * 0.0, 0
    return head_loss(model, h, targets, chunk_tokens, options), n


def trained_positions(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hidden states (B, T, d) of the positions whose next label is trained (position ``t`` predicts
    ``labels[t + 1]``), those labels, and where the positions are among the B × (T − 1) predicting ones."""
    targets = labels[:, 1:].reshape(-1)
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, keep)
    return h, targets.index_select(0, keep), keep


def head_loss(model: nn.Module, h: torch.Tensor, y: torch.Tensor, chunk_tokens: int | None,
              options: RuntimeOptions, segments: torch.Tensor | None = None, n_segments: int = 0) -> torch.Tensor:
    """Summed cross-entropy of the head's logits of hidden states ``h`` (n × d) against targets ``y`` (n), chunked:
    the logits of all n positions are never held at once. With ``segments`` (n,), the sums per segment (a vector
    of ``n_segments``)."""
    head = model.get_output_embeddings()
    lora_head = hasattr(head, "base_layer") and not (head.merged or head.disabled)
    base = getattr(head, "base_layer", head)
    if getattr(base, "bias", None) is not None:
        raise NotImplementedError("output heads with a bias are not supported by the chunked loss")
    if lora_head and head.variant.name != "lora":
        # A DoRA (or 4-bit) head: its row norms (or dequantized weight) belong to its own kernel, so the logits of
        # the trained positions are made by the layer itself, unchunked. Rare; correct before lean.
        return _unchunked_loss(head(h), y, logit_softcap(model), segments, n_segments)
    chunk = chunk_tokens or loss_chunk_tokens(base.weight.shape[0])
    lora = ()
    if lora_head:
        # Plain LoRA head, merge-free (kernels.loss): u = dropout(h) Aᵀ here, with autograd (n × r, small);
        # the kernel adds s · u Bᵀ to each chunk's logits. nn.Dropout's mask, as PEFT's LoRA layers draw it.
        a, b = head.lora_A.weight, head.lora_B.weight
        u = F.dropout(h, head.dropout_p, training=head.training).to(a.dtype) @ a.t()
        lora = (u, b, head.scaling)
    if segments is not None and not lora:
        lora = (None, None, 0.0)
    return LinearCrossEntropy.apply(h, head._weight_out_in() if lora_head else base.weight, y, chunk,
                                    logit_softcap(model), options, *lora,
                                    *((segments, n_segments) if segments is not None else ()))


# A common prefix shorter than this is not worth a second pass through the stack.
MIN_SHARED_PREFIX = 8


def hidden_states(model: nn.Module, body: nn.Module, inputs: dict, share: bool = True) -> torch.Tensor:
    """The decoder stack's last hidden states, running the tokens every row of the batch starts with once.

    Chat samples open with the same tokens (a chat template's system turn, a task's instruction: a third to a
    half of a short sample). Those are run as one row and their key/value cache is repeated for the batch, as
    :func:`lorafit.eval.tasks.generate_answers` does. With autograd the repeated cache sums each row's gradient
    back into the one prefix, so loss and gradients equal the plain pass's to float rounding; the prefix's LoRA
    dropout mask is then drawn once for all rows. Not under gradient checkpointing (its recompute would extend
    the cache twice) nor packing. ``share``: the run's option (``RuntimeOptions.shared_prefix``); off, rows run whole.
    """
    checkpointed = torch.is_grad_enabled() and getattr(model, "is_gradient_checkpointing", False)
    shared = 0 if checkpointed or not share else _shared_prefix(inputs)
    if not shared:
        return body(**inputs).last_hidden_state
    from transformers import DynamicCache

    ids, rows = inputs["input_ids"], inputs["input_ids"].shape[0]
    cache = DynamicCache(config=model.config)
    key = cache_kwarg(body)
    # Two rows, not one, when the kernels are compiled: torch.compile specializes a dimension of size 1, so a batch
    # of one would compile every fused kernel again (cold, on the demo: 38 s more than the prefix saves). The second
    # row is dropped. Uncompiled (lorafit eval's plain model) one row does: the second cost 9% of the eval loss.
    handle = getattr(model, "lean_kernels", None)
    n = 2 if handle is not None and handle.options.compile else 1
    prefix = body(input_ids=ids[:n, :shared], use_cache=True, **{key: cache}).last_hidden_state[:1]
    cache.batch_select_indices(torch.zeros(rows, dtype=torch.long, device=ids.device))
    rest = body(input_ids=ids[:, shared:], attention_mask=inputs.get("attention_mask"), use_cache=True,
                **{key: cache}).last_hidden_state
    return torch.cat([prefix.expand(rows, -1, -1), rest], dim=1)


def _shared_prefix(inputs: dict) -> int:
    """How many leading tokens all rows share, unmasked (0: one row, packed rows, other inputs, a short prefix,
    or a distributed run, whose wrapped modules expect one forward per step). Leaves at least one column."""
    ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
    if (ids is None or ids.dim() != 2 or ids.shape[0] < 2 or set(inputs) - {"input_ids", "attention_mask"}
            or (torch.distributed.is_available() and torch.distributed.is_initialized())):
        return 0
    same = (ids == ids[:1]).all(0)
    if mask is not None:
        same &= mask.bool().all(0)
    differs = (~same[:-1]).nonzero()
    n = int(differs[0]) if differs.numel() else ids.shape[1] - 1
    return n if n >= MIN_SHARED_PREFIX else 0


def _unchunked_loss(logits: torch.Tensor, y: torch.Tensor, softcap: float | None,
                    segments: torch.Tensor | None = None, n_segments: int = 0) -> torch.Tensor:
    logits = logits.float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if segments is None:
        return F.cross_entropy(logits, y, reduction="sum")
    per_token = F.cross_entropy(logits, y, reduction="none")
    return per_token.new_zeros(n_segments).index_add(0, segments, per_token)
