"""LoRA dropout whose mask is never stored: each keep bit is a function of a per-call seed and the element.

Why: PEFT's ``nn.Dropout`` keeps a mask and a dropped-out copy of the input for backward. Drawing the mask
from torch's generator (mt19937, one serial draw per 32 random bits) and keeping it, even packed as bits,
cost more time than the LoRA matmuls it feeds. Here a call draws one seed from torch's global RNG (so a
checkpoint's saved RNG state reproduces it on resume, and activation checkpointing's RNG replay on
recomputation), and the mask is recomputed from the seed wherever it is applied, in forward and again in
backward. Only the seed is saved.

With compiled kernels (``RuntimeOptions.compile``, the default), the keep bit of element ``i`` is ``hash(i, seed)``, computed inside one
fused kernel with the multiply it feeds. The hash is lowbias32 (C. Wellons' "hash prospector": a 32-bit mixer
with near-ideal avalanche), applied twice with the two seed halves as keys, on wrapping int32 lanes; an
element is kept iff the top 24 bits of its hash are ≥ ``round(p · 2²⁴)`` (p holds to 2⁻²⁴; indices wrap at
2³² elements per call). With compiling turned off, eager PyTorch would need ~25 passes over memory for the hash,
so the mask is drawn instead from a generator seeded with the call's seed (an int64 seed says which of the two
a call used, so its backward recomputes the same mask). Which one a run uses is decided once, by its options,
never by whether a compile happened to fail: a hashed mask whose kernel cannot be compiled is computed
eagerly, the same mask, only slower.

The drawn mask does not draw a number per element: on CPU ``bernoulli_`` costs ~70 elementwise passes (one
serial mt19937 draw per element; 0.9 s of a 3.3 s demo step, a quarter of it). Independent keep bits are a
Bernoulli process, whose dropped positions are separated by independent geometric(p) gaps; so the mask draws
only the gaps (about p · n uniforms, turned into gaps by inversion) and zeroes the positions they reach, the
same distribution at ~1/8 of the time for p = 0.05. On CUDA ``bernoulli_`` (Philox) is already cheap and is used.
"""

from __future__ import annotations

import math

import torch

from lorafit.kernels.compiled import compiled

_BITS = 24
# The eager mask's gap draws: the mean count of dropped positions plus this many standard deviations (and 16), so
# one round almost always reaches the end; a short round draws again from where it stopped. At most _ROUND draws a
# round (2 MiB of temporaries beside the mask); the mask does not depend on how the draws are split into rounds.
_SPARE_SD = 6.0
_ROUND = 2**17


def _const(c: int) -> int:  # a 32-bit constant as the int32 value with the same bits
    return c - (1 << 32) if c >= 1 << 31 else c


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:  # logical (not arithmetic) shift right of int32 lanes
    return (x >> k) & ((1 << (32 - k)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x ^ _shr(x, 16)
    x = x * _const(0x7FEB352D)
    x = x ^ _shr(x, 15)
    x = x * _const(0x846CA68B)
    return x ^ _shr(x, 16)


def _hash_keep(seed: torch.Tensor, shape, p: float, dtype: torch.dtype) -> torch.Tensor:
    """0/1 in ``dtype`` for a row-major tensor of ``shape`` (int32 seed: the hashed mask)."""
    n = shape[0] * shape[1]
    if n < 2**31:
        i = torch.arange(n, dtype=torch.int32, device=seed.device)
    else:  # wraps to int32: the mask repeats every 2³² elements
        i = torch.arange(n, dtype=torch.int64, device=seed.device).to(torch.int32)
    h = _mix(_mix(i ^ seed[0]) ^ seed[1])
    return (_shr(h, 32 - _BITS) >= round(p * (1 << _BITS))).to(dtype).view(shape)


def _drawn_keep(seed: torch.Tensor, shape, p: float, dtype: torch.dtype) -> torch.Tensor:
    """0/1 in ``dtype`` drawn from a generator seeded with ``seed`` (int64: the eager mask)."""
    if p <= 0:
        return torch.ones(shape, dtype=dtype, device=seed.device)
    gen = torch.Generator(seed.device).manual_seed(int(seed))
    if seed.device.type != "cpu" or p > 0.5:  # most positions dropped: drawing each gap costs what bernoulli_ does
        return torch.empty(shape, dtype=dtype, device=seed.device).bernoulli_(1.0 - p, generator=gen)
    n = math.prod(shape)
    keep = torch.ones(n + 1, dtype=dtype)  # the last slot takes the positions that fall past the end
    step = math.log1p(-p)
    start = 0
    while start < n:
        m = min(_ROUND, max(1, int((n - start) * p + _SPARE_SD * math.sqrt((n - start) * p) + 16)))
        # gaps by inversion, P(gap > k) = (1 - p)^k, in place in float64; a gap past the end is cut to reach just
        # past it (the same mask: such a position is dropped nowhere), so sums stay exact and within int64 for any p
        gaps = torch.empty(m, dtype=torch.float64).uniform_(generator=gen).neg_().log1p_().div_(step).ceil_()
        at = gaps.clamp_(min=1, max=n - start + 1).cumsum_(0).add_(start - 1).to(torch.int64)
        del gaps
        start = int(at[-1]) + 1
        keep.index_fill_(0, at.clamp_(max=n), 0)
    return keep[:n].view(shape)


def _keep(seed: torch.Tensor, shape, p: float, dtype: torch.dtype) -> torch.Tensor:
    return (_hash_keep if seed.dtype == torch.int32 else _drawn_keep)(seed, tuple(shape), p, dtype)


def _dropped(x, seed, p: float):
    return x * _keep(seed, x.shape, p, x.dtype)


def _add_dropped(base, low, seed, p: float):
    return base + low * _keep(seed, low.shape, p, low.dtype)


def _dropped_and_add_dropped(x, base, low, seed, p: float):
    keep = _keep(seed, x.shape, p, x.dtype)
    return x * keep, base + low * keep


def _dropped_each(x, seeds, p: float):
    return tuple(x * _keep(s, x.shape, p, x.dtype) for s in seeds)


def _dropped_each_and_add(x, base, lows, seeds, p: float):
    keeps = [_keep(s, x.shape, p, x.dtype) for s in seeds]
    grad = base
    for low, keep in zip(lows, keeps, strict=True):
        grad = grad + low * keep
    return (*(x * keep for keep in keeps), grad)


class _MaskKernel:
    """``fn(*tensors, seed, p)``: one fused compiled kernel for hashed (int32) seeds, eager PyTorch for drawn
    (int64) ones. Under a memory tracker (``lorafit measure``) the fused kernel shows only its outputs (what it
    allocates, also when it falls back to eager after a compiler failure), while the eager path runs in the
    tracker's sight: its full-size drawn mask and the products are real allocations of a run with
    compiling off, and the estimator counts them (``lorafit.memory.activations.eager_dropout_temporaries``)."""

    def __init__(self, fn):
        self.fn = fn
        self.compiled = compiled(fn)

    def __call__(self, *tensors, seed, p: float):
        seeds = seed if isinstance(seed, tuple) else (seed,)
        if all(s.dtype == torch.int32 for s in seeds):
            return self.compiled.kernel(*tensors, seed, p)
        return self.fn(*tensors, seed, p)


dropped = _MaskKernel(_dropped)  # x · keep
add_dropped = _MaskKernel(_add_dropped)  # base + low · keep
dropped_and_add_dropped = _MaskKernel(_dropped_and_add_dropped)  # both, one pass over the mask
# Several layers reading the same x (``lora.group``), ``seed`` a tuple with one seed per layer:
dropped_each = _MaskKernel(_dropped_each)  # (x · keep_i for each i), one pass over x
dropped_each_and_add = _MaskKernel(_dropped_each_and_add)  # (*x · keep_i, base + Σ low_i · keep_i)


def new_seed(device, hashed: bool) -> torch.Tensor:
    """A call's seed, from torch's global RNG of ``device``: two int32 halves for the hashed mask (compiled
    kernels on), else one int64 for the drawn mask."""
    if hashed:
        return torch.empty(2, dtype=torch.int32, device=device).random_()
    return torch.empty((), dtype=torch.int64, device=device).random_()


def keep_mask(seed: torch.Tensor, shape, p: float, dtype=torch.float32) -> torch.Tensor:
    """The 0/1 mask a call with ``seed`` applies to an input of ``shape`` (rows × cols)."""
    return _keep(seed, shape, p, dtype)
