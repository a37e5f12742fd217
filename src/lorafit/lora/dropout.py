"""LoRA dropout whose mask is never stored: each keep bit is a hash of (seed, element index).

Why: PEFT's ``nn.Dropout`` keeps a mask and a dropped-out copy of the input for backward. Drawing the mask
from torch's generator (mt19937, one serial draw per 32 random bits) and keeping it even as packed bits cost
more time than the LoRA matmuls it feeds. Here a call draws one 62-bit seed from torch's global RNG (so a
checkpoint's saved RNG state reproduces it on resume, and activation checkpointing's RNG replay on
recomputation); the keep bit of element ``i`` is ``hash(i, seed)``, computed inside the fused elementwise
kernel that applies the mask, in forward and again in backward. Only the seed is saved.

The hash is lowbias32 (C. Wellons' "hash prospector": a 32-bit mixer with near-ideal avalanche), applied
twice with the two seed halves as keys, on wrapping int32 lanes. An element is kept iff the top 24 bits of
its hash are ≥ ``round(p · 2²⁴)``, so ``p`` holds to 2⁻²⁴. Indices wrap at 2³² elements per call.
"""

from __future__ import annotations

import torch

from lorafit.train.compiled import compiled

_BITS = 24
_EAGER_BLOCKS = 64  # eager runs in this many row blocks (of ≥ 4096 elements): its int32 temporaries stay small


def new_seed(device) -> torch.Tensor:
    """Two 31-bit halves of a seed, from torch's global RNG of ``device``."""
    return torch.empty(2, dtype=torch.int32, device=device).random_()


def threshold(p: float) -> int:
    return round(p * (1 << _BITS))


def _const(c: int) -> int:  # a 32-bit constant as the int32 value with the same bits
    return c - (1 << 32) if c >= 1 << 31 else c


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:  # logical (not arithmetic) shift right of int32 lanes
    return (x >> k) & ((1 << (32 - k)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on a fresh int32 tensor, in place (eager, one temporary at a time; compiled, one fused loop)."""
    x ^= _shr(x, 16)
    x *= _const(0x7FEB352D)
    x ^= _shr(x, 15)
    x *= _const(0x846CA68B)
    x ^= _shr(x, 16)
    return x


def _keep(seed: torch.Tensor, shape, thr: int, offset: int, dtype: torch.dtype) -> torch.Tensor:
    """0/1 in ``dtype`` for the elements ``offset …`` of a row-major tensor of ``shape``."""
    end = offset + shape[0] * shape[1]
    if end < 2**31:
        h = torch.arange(offset, end, dtype=torch.int32, device=seed.device)
    else:  # wraps to int32: the mask repeats every 2³² elements
        h = torch.arange(offset, end, dtype=torch.int64, device=seed.device).to(torch.int32)
    h ^= seed[0]
    h = _mix(h)
    h ^= seed[1]
    h = _mix(h)
    return (_shr(h, 32 - _BITS) >= thr).to(dtype).view(shape)


def _dropped(x, seed, thr: int, offset: int):
    return x * _keep(seed, x.shape, thr, offset, x.dtype)


def _add_dropped(base, low, seed, thr: int, offset: int):
    return base + low * _keep(seed, low.shape, thr, offset, low.dtype)


def _dropped_and_add_dropped(x, base, low, seed, thr: int, offset: int):
    keep = _keep(seed, x.shape, thr, offset, x.dtype)
    return x * keep, base + low * keep


class _MaskKernel:
    """``fn(*tensors, seed, thr, offset)`` on 2-D tensors of one shape: compiled into one fused kernel, or eager
    over row blocks (same values: the mask depends only on the element index)."""

    def __init__(self, fn):
        self.fn = fn
        self.compiled = compiled(fn)

    def __call__(self, *tensors, seed: torch.Tensor, p: float):
        thr = threshold(p)
        if self.compiled.usable:
            return self.compiled(*tensors, seed, thr, 0)
        rows, cols = tensors[0].shape
        if rows == 0:
            return self.fn(*tensors, seed, thr, 0)
        step = max(1, rows // _EAGER_BLOCKS, 4096 // max(cols, 1))
        outs = None
        for r in range(0, rows, step):
            res = self.fn(*(t[r:r + step] for t in tensors), seed, thr, r * cols)
            res = res if isinstance(res, tuple) else (res,)
            if outs is None:
                outs = tuple(torch.empty((rows, cols), dtype=o.dtype, device=o.device) for o in res)
            for o, v in zip(outs, res, strict=True):
                o[r:r + step] = v
        return outs if len(outs) > 1 else outs[0]


dropped = _MaskKernel(_dropped)  # x · keep
add_dropped = _MaskKernel(_add_dropped)  # base + low · keep
dropped_and_add_dropped = _MaskKernel(_dropped_and_add_dropped)  # both, one pass over the mask


def keep_mask(seed: torch.Tensor, shape, p: float, dtype=torch.float32) -> torch.Tensor:
    """The 0/1 mask a call with ``seed`` applies to a (rows × cols) input (for tests and inspection)."""
    return _keep(seed, tuple(shape), threshold(p), 0, dtype)
