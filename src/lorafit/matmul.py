"""Which dtype the frozen model's matmuls compute in when it is stored in bf16.

On GPUs and on CPUs with AMX (Sapphire Rapids and later), a bf16 GEMM is several times faster than an fp32
one. On x86 CPUs without AMX, oneDNN's bf16 GEMM is *slower* than fp32 (AVX-512 with avx512_bf16, 2 threads,
1024×576×1536: 162 vs 241 GFLOP/s; ``python benchmarks/half_matmul.py`` times it on any CPU), and a bf16
training step was slower than an fp32 one. There the frozen GEMMs of the LoRA layers and of the loss run on
fp32 copies of their bf16 operands, made just before each GEMM and freed right after, and the result is
rounded once to bf16. That is the bf16 GEMM's own math: a product of two bf16 numbers is exact in fp32, the
sum is accumulated in fp32 either way, and the result is rounded once; only the summation order differs.
Weights and saved activations stay in bf16, so the memory saving of a bf16 base is kept, less the transient
fp32 copies (the memory estimator counts them).

The choice follows the CPU's instruction set, not a timing, so every process on a machine (training,
``lorafit estimate``, a resumed run) makes the same one and a run's numerics do not depend on the load at
start-up (an in-process timing probe flipped between processes on a busy 2-core machine). Non-x86 CPUs keep
native bf16. ``LORAFIT_HALF_MATMUL`` overrides it: ``auto`` (default), ``native`` or ``fp32``.
"""

from __future__ import annotations

import os

import torch

from lorafit.errors import LorafitError

ENV = "LORAFIT_HALF_MATMUL"
MODES = ("auto", "native", "fp32")
# Below this many rows (tokens) the weight's fp32 copy costs more than the faster GEMM saves ("auto" only):
# generation's one-token steps and tiny batches keep the native GEMM. Converting a weight costs about as much
# as ~100 rows of the GEMM's saving on the 135M shape.
MIN_ROWS = 128
# The loss's head is copied whole, once per step (its GEMMs run chunk by chunk over all of it). A copy larger
# than this stays native: it would add more to the peak than the chunked loss saves (Llama 3.2 1B's
# 128k-vocabulary head is 1 GiB in fp32; SmolLM2-135M's is 109 MiB).
HEAD_COPY_MAX_BYTES = 256 * 2**20


def mode() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise LorafitError(f"{ENV}={value!r}: use one of {', '.join(MODES)}")
    return value


def slow_bf16_gemm() -> bool:
    """An x86 CPU without AMX: bf16 GEMMs run on AVX-512/AVX2 units, slower than fp32 ones. (torch's own
    cpuinfo-based checks; private, so a torch without them keeps native bf16.)"""
    avx2 = getattr(torch.cpu, "_is_avx2_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return avx2 is not None and amx is not None and avx2() and not amx()


def compute_dtype(dtype: torch.dtype, device: torch.device | str, rows: int | None = None) -> torch.dtype:
    """The dtype frozen GEMMs over tensors stored in ``dtype`` run in on ``device``: ``dtype`` or fp32.
    ``rows``: the GEMM's rows (tokens), if known; a GEMM with fewer than ``MIN_ROWS`` stays native in "auto"."""
    if dtype != torch.bfloat16 or torch.device(device).type != "cpu":
        return dtype  # fp32 already, or a GPU: its bf16 GEMMs are the fast ones
    m = mode()
    if m == "native" or (m == "auto" and ((rows is not None and rows < MIN_ROWS) or not slow_bf16_gemm())):
        return dtype
    return torch.float32


def upcasts(dtype: torch.dtype, device: torch.device | str, rows: int | None = None) -> bool:
    """Whether :func:`compute_dtype` turns ``dtype`` into fp32 on ``device``."""
    return compute_dtype(dtype, device, rows) != dtype


def head_copy_allowed(numel: int) -> bool:
    """Whether a (vocab × hidden) head of ``numel`` elements may be copied to fp32: under the cap, or forced."""
    return mode() == "fp32" or 4 * numel <= HEAD_COPY_MAX_BYTES


def upcasts_head(dtype: torch.dtype, device: torch.device | str, rows: int, numel: int) -> bool:
    """Whether the loss copies a frozen (vocab × hidden) head of ``numel`` elements to fp32 (see above)."""
    return upcasts(dtype, device, rows) and head_copy_allowed(numel)
