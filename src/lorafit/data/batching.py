"""Samples -> batches of tensors, deterministic given (seed, epoch), with or without sample packing.

Conventions the trainer relies on:

* ``labels`` are aligned with ``input_ids`` (HF convention); the loss predicts ``labels[:, 1:]`` from
  ``logits[:, :-1]``. ``num_trained_tokens`` is ``(labels[:, 1:] != -100).sum()``: normalise the loss by it.
* Padding is on the right; pad positions have label -100 (whatever ``pad_id`` is, even when it equals EOS).
* The first token of every sample has label -100. Unpacked this changes nothing (position 0 is never
  predicted); packed it stops the last token of one sample from being trained to predict the next sample.

Packing: whole samples are placed first-fit into rows of at most ``sequence_len`` tokens, in the (shuffled)
sample order. ``position_ids`` restart at 0 for each sample. Samples in one row must not attend to each
other: :func:`model_inputs` passes ``position_ids`` with no 2-D ``attention_mask`` and ``use_cache=False``,
which is the case in which transformers (``masking_utils.find_packed_sequence_indices``) builds a
block-diagonal causal mask for sdpa, eager and flex attention (and flash-attention uses the same positions
for its varlen path). ``use_cache=False`` is required: with the model's default ``use_cache=True`` a cache
object is created even in training mode, and transformers 5.x then skips packed-sequence detection and
silently lets packed samples attend to each other. ``model_inputs(batch, mask="4d")`` instead passes an explicit additive 4-D mask
(:func:`block_causal_mask`), which transformers uses as is.
"""

from __future__ import annotations

import random
from typing import Literal

import torch

from lorafit.data.formats import IGNORE

Batch = dict  # str -> torch.Tensor, plus "num_trained_tokens": int


def _order(n: int, shuffle: bool, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def pack(lengths: list[int], order: list[int], capacity: int) -> list[list[int]]:
    """First-fit: put each sample (in ``order``) into the first row with room; a new row otherwise."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sample of {n} tokens exceeds sequence_len {capacity}; truncate first")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return rows


def batches(
    samples,
    *,
    micro_batch_size: int,
    sequence_len: int,
    pad_id: int,
    packing: bool,
    shuffle: bool,
    seed: int,
    epoch: int,
    pad_to_sequence_len: bool = False,
) -> list[Batch]:
    """All micro-batches of one epoch; the same arguments always give the same list (resume by index).

    Each batch has ``input_ids``, ``labels`` (B, L) and ``num_trained_tokens``; unpacked batches add a 2-D
    ``attention_mask`` (1 = token, 0 = pad), packed ones ``position_ids`` and ``seq_ids`` (B, L: index of the
    sample within its row; padding is its own final block). ``L`` is the longest row in the batch, or
    ``sequence_len`` with ``pad_to_sequence_len``.
    """
    if micro_batch_size < 1:
        raise ValueError("micro_batch_size must be >= 1")
    order = _order(len(samples), shuffle, seed, epoch)
    if packing:
        rows = pack([len(s.input_ids) for s in samples], order, sequence_len)
    else:
        rows = [[i] for i in order]
    out = []
    for b in range(0, len(rows), micro_batch_size):
        group = rows[b : b + micro_batch_size]
        out.append(_collate([[samples[i] for i in row] for row in group], sequence_len, pad_id, packing,
                            pad_to_sequence_len))
    return out


def _collate(rows, sequence_len: int, pad_id: int, packing: bool, pad_to_sequence_len: bool) -> Batch:
    lengths = [sum(len(s.input_ids) for s in row) for row in rows]
    width = sequence_len if pad_to_sequence_len else max(lengths)
    bsz = len(rows)
    input_ids = torch.full((bsz, width), pad_id, dtype=torch.long)
    labels = torch.full((bsz, width), IGNORE, dtype=torch.long)
    attention = torch.zeros((bsz, width), dtype=torch.long)
    position_ids = torch.zeros((bsz, width), dtype=torch.long)
    seq_ids = torch.zeros((bsz, width), dtype=torch.long)
    for r, row in enumerate(rows):
        pos = 0
        for k, s in enumerate(row):
            n = len(s.input_ids)
            input_ids[r, pos : pos + n] = torch.tensor(s.input_ids)
            lab = torch.tensor(s.labels)
            lab[0] = IGNORE
            labels[r, pos : pos + n] = lab
            attention[r, pos : pos + n] = 1
            position_ids[r, pos : pos + n] = torch.arange(n)
            seq_ids[r, pos : pos + n] = k
            pos += n
        if pos < width:  # padding: its own block with its own positions, never attended to by real tokens
            position_ids[r, pos:] = torch.arange(width - pos)
            seq_ids[r, pos:] = len(row)
    batch: Batch = {"input_ids": input_ids, "labels": labels}
    if packing:
        batch["position_ids"] = position_ids
        batch["seq_ids"] = seq_ids
    else:
        batch["attention_mask"] = attention
    batch["num_trained_tokens"] = int((labels[:, 1:] != IGNORE).sum())
    return batch


def block_causal_mask(seq_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive (B, 1, L, L) mask: 0 where query i may attend key j (same sample, j <= i), else -inf-ish."""
    same = seq_ids[:, :, None] == seq_ids[:, None, :]
    L = seq_ids.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=seq_ids.device).tril()
    allowed = (same & causal)[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seq_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def model_inputs(batch: Batch, *, mask: Literal["auto", "4d"] = "auto",
                 dtype: torch.dtype = torch.float32) -> dict:
    """The keyword arguments for ``model(...)`` (no labels: the trainer computes the loss itself).

    Unpacked: ``input_ids`` and ``attention_mask``. Packed: ``input_ids``, ``position_ids`` and
    ``use_cache=False`` so transformers derives the per-sample causal mask from the position restarts; with
    ``mask="4d"`` an explicit additive mask in ``dtype`` (the model's compute dtype) is passed as well.
    """
    kwargs = {"input_ids": batch["input_ids"]}
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
        kwargs["use_cache"] = False
        if mask == "4d":
            kwargs["attention_mask"] = block_causal_mask(batch["seq_ids"], dtype)
    else:
        kwargs["attention_mask"] = batch["attention_mask"]
    return kwargs
