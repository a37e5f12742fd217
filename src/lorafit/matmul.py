"""Which dtype the frozen model's matmuls compute in when it is stored in bf16 or fp16.

On GPUs and on CPUs with AMX (Sapphire Rapids and later), a bf16 GEMM is several times faster than an fp32
one. On CPUs without it, oneDNN's bf16 GEMM is *slower* than fp32 (AVX-512 with avx512_bf16, 2 threads,
1024×576×1536: 162 vs 241 GFLOP/s), and a bf16 training step is slower than an fp32 one. There the frozen
GEMMs of the LoRA layers and of the loss run on fp32 copies of their bf16 operands, made just before each
GEMM and freed right after, and the result is rounded once to bf16. That is the bf16 GEMM's own math: a
product of two bf16 (or fp16) numbers is exact in fp32, the sum is accumulated in fp32 either way, and the
result is rounded once; only the summation order differs. Weights and saved activations stay in bf16, so
the memory saving of a bf16 base is kept, less the transient fp32 copies (the memory estimator counts them).

Which is faster is measured, not guessed from CPU flags: the first call times one representative GEMM both
ways (about 0.2 s, once per process, dtype and thread count). ``LORAFIT_HALF_MATMUL`` overrides it:
``auto`` (default), ``native`` (always the bf16/fp16 GEMM) or ``fp32``.
"""

from __future__ import annotations

import functools
import os
import time

import torch
from torch.utils._python_dispatch import _disable_current_modes

from lorafit.errors import LorafitError

ENV = "LORAFIT_HALF_MATMUL"
MODES = ("auto", "native", "fp32")
HALF = (torch.bfloat16, torch.float16)
# fp32 only when clearly faster: on a CPU where both are about equal, keep the dtype the user asked for.
MARGIN = 0.9
# Below this many rows (tokens) the weight's fp32 copy costs more than the faster GEMM saves ("auto" only):
# generation's one-token steps and tiny batches keep the native GEMM. Converting a weight costs about as much
# as ~100 rows of the GEMM's saving on the 135M shape.
MIN_ROWS = 128


def mode() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise LorafitError(f"{ENV}={value!r}: use one of {', '.join(MODES)}")
    return value


def compute_dtype(dtype: torch.dtype, device: torch.device | str, rows: int | None = None) -> torch.dtype:
    """The dtype frozen GEMMs over tensors stored in ``dtype`` run in on ``device``: ``dtype`` or fp32.
    ``rows``: the GEMM's rows (tokens), if known; a GEMM with fewer than ``MIN_ROWS`` stays native in "auto"."""
    if dtype not in HALF or torch.device(device).type != "cpu":
        return dtype  # fp32 already, or a GPU: its bf16 GEMMs are the fast ones
    m = mode()
    if m == "native" or (m == "auto" and ((rows is not None and rows < MIN_ROWS)
                                         or not _fp32_faster(dtype, torch.get_num_threads()))):
        return dtype
    return torch.float32


def upcasts(dtype: torch.dtype, device: torch.device | str, rows: int | None = None) -> bool:
    """Whether :func:`compute_dtype` turns ``dtype`` into fp32 on ``device``."""
    return compute_dtype(dtype, device, rows) != dtype


def probe(dtype: torch.dtype, tokens: int = 512, features: int = 1024, repeats: int = 7) -> tuple[float, float]:
    """Seconds for one (tokens × features) @ (features × features) CPU GEMM in ``dtype``, and the same GEMM
    on fp32 copies rounded back to ``dtype`` (the copies included); best of ``repeats``, taken in turns."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, features, generator=gen).to(dtype)
    w = torch.randn(features, features, generator=gen).to(dtype)
    # Preallocated buffers: the steady state of a training step, where the allocator reuses freed blocks.
    # Fresh allocations here would time page faults of the first calls instead (the result flipped with them).
    x32, w32, y32 = torch.empty(x.shape), torch.empty(w.shape), torch.empty(tokens, features)
    y, y_half = torch.empty(tokens, features, dtype=dtype), torch.empty(tokens, features, dtype=dtype)

    def upcast():
        torch.mm(x32.copy_(x), w32.copy_(w).t(), out=y32)
        y_half.copy_(y32)

    fns = (lambda: torch.mm(x, w.t(), out=y), upcast)
    for fn in fns:  # warm-up: thread pool, oneDNN primitives, malloc's mmap threshold and first-touch pages
        for _ in range(5):
            fn()
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0], best[1]


@functools.cache
def _fp32_faster(dtype: torch.dtype, threads: int) -> bool:
    with _disable_current_modes():  # a memory tracker watching the step must not count the probe
        native, upcast = probe(dtype)
    return upcast < MARGIN * native
