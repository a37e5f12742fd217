"""Runtime options: how the lean kernels run, resolved once at start and passed down. Imports no torch.

Two choices change what a step computes and allocates, so they are made once per run — from the config, with
the environment as a fallback — frozen in a :class:`RuntimeOptions`, printed in the run header and handed to
the kernels, the model patches and the memory estimator alike. Nothing reads the environment on a hot path.

* ``compile`` (``compile_kernels`` in the YAML, ``LORAFIT_COMPILE`` as fallback, default ``auto``): the small
  pure kernels (RMSNorm, RoPE, SiLU·up, the dropout hash) run through ``torch.compile``. ``auto`` compiles
  unless the run is planned too short to repay the compile time (:func:`compile_pays`). With it on, dropout masks
  are a hash of a per-call seed (same mask whether the kernel ends up compiled or, after a compiler failure,
  eager); with it off they are drawn from torch's generator (``lorafit.kernels.dropout``).
* ``half_matmul`` (``half_matmul``, ``LORAFIT_HALF_MATMUL``, default ``auto``): the dtype the frozen GEMMs of a
  bf16 model (fp16 alike: ``HALF_DTYPES``) run in on a CPU. On x86 CPUs without AMX, oneDNN's bf16 GEMM is
  slower than fp32 (``python benchmarks/half_matmul.py`` times both; its JSON is in ``benchmarks/results/``).
  There the frozen LoRA GEMMs, the loss's head and causal attention run on fp32 copies of their bf16 operands,
  made just before each kernel and freed right after, and the result is rounded once: the bf16 GEMM's own math
  (a product of two bf16 — or fp16 — numbers is exact in fp32, sums accumulate in fp32 either way), only the
  summation order differs.
  ``auto`` decides from the CPU's flags, not a timing, so every process on a machine (training,
  ``lorafit estimate``, a resumed run) makes the same choice; ``native`` and ``fp32`` force one.

The rules that turn these options into a decision (:meth:`RuntimeOptions.upcasts` and friends) live here, so
training and the estimator cannot disagree.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import cache

from lorafit.errors import LorafitError

ENV_COMPILE = "LORAFIT_COMPILE"
ENV_HALF_MATMUL = "LORAFIT_HALF_MATMUL"
ENV_SHARED_PREFIX = "LORAFIT_SHARED_PREFIX"
HALF_MATMUL_MODES = ("auto", "native", "fp32")
# The stored dtypes the rule copies to fp32. fp16 goes as bf16 does: on the AVX2 EPYC without AMX this was written
# on (1 thread, torch 2.13), a (1024 × 576) @ (576 × 1536) torch.mm took 1375 ms in fp16 and 1432 ms in bf16,
# against 19.7 ms for both on fp32 copies (copies and the rounding back included): both ~70× slower natively.
# One CPU fact (no AMX) decides both; an AMX CPU (AMX-BF16, and AMX-FP16 on newer ones) keeps them native.
HALF_DTYPES = ("bfloat16", "float16")
_FALSE = ("0", "false", "no", "off")
_TRUE = ("1", "true", "yes", "on", "")

# Below this many rows (tokens) a weight's fp32 copy costs more than the faster GEMM saves ("auto" only):
# generation's one-token steps and tiny batches keep the native GEMM. Converting a weight costs about as much
# as ~100 rows of the GEMM's saving on the 135M shape.
MIN_ROWS = 128
# The loss's head is copied whole, once per step. A copy larger than this stays native: it would add more to
# the peak than the chunked loss saves (Llama 3.2 1B's 128k-vocabulary head is 1 GiB in fp32; SmolLM2-135M's
# is 109 MiB). "fp32" copies it whatever its size.
HEAD_COPY_MAX_BYTES = 256 * 2**20
# Logit elements per chunk of the chunked loss: 2**23 fp32 values = 32 MiB (170 tokens of a 49k vocabulary).
LOSS_CHUNK_ELEMENTS = 2**23


# ``compile_kernels: auto`` compiles when a run plans at least this many tokens (max_steps × micro-batch ×
# accumulation × sequence_len, an upper bound of what it trains on). Measured on an AMD EPYC with AVX2 (fp32,
# SmolLM2-135M shape, LoRA r 16 on all linear layers, dropout 0.05), with the eager dropout mask that draws
# only the dropped positions (``lorafit.kernels.dropout``):
# - full 4 × 256 rows (``python benchmarks/peer.py --configs 135m-fp32 --peers peft-loop --compile-kernels
#   true|false``, 2 threads): a step took 13.1 s of CPU compiled against 14.7 s eager, 1.6 ms per token saved;
# - the demo (8 × 128 planned, ~580 tokens a step, the rows' shared opening run once;
#   ``benchmarks/compile_payoff.py examples/demo.yaml --steps 16``, 1 thread): no saving (3.89 s of CPU a step eager,
#   4.14 s compiled).
# Compiling cost 80 s with an empty Inductor cache, 9–12 s with a filled one. Full rows repay a cold compile after
# ~50k tokens; shorter rows train fewer tokens than planned and save less per token, so the bound is twice that: a
# first run on a new machine is not slowed, a filled cache compiles in a fraction of the time, and larger models
# save more per token, so for them it is conservative. (Before the cheap eager mask, compiling also saved the eager
# ``bernoulli_`` mask, a quarter of a demo step, and the bound was 48k tokens.)
COMPILE_MIN_TOKENS = 96 * 1024


def compile_pays(planned_tokens: int | None) -> bool:
    """``auto``: whether compiling the kernels pays for a run of ``planned_tokens`` (None: unknown, e.g. a
    run of ``num_epochs`` — assumed long enough)."""
    return planned_tokens is None or planned_tokens >= COMPILE_MIN_TOKENS


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as the kernel reports them (Linux ``/proc/cpuinfo``); empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return frozenset()


def cpu_has_slow_bf16_gemm() -> bool:
    """An x86 CPU with AVX2 but without AMX: its bf16 GEMMs run on vector units, slower than fp32 ones.
    Other CPUs, and systems that do not report flags, keep native bf16."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    flags = cpu_flags()
    return "avx2" in flags and "amx_tile" not in flags


def _env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = env.get(name)
    if value is None:
        return default
    value = value.strip().lower()
    if value in _FALSE:
        return False
    if value in _TRUE:
        return True
    raise LorafitError(f"{name}={value!r}: use 1, 0 or auto")


@dataclass(frozen=True)
class RuntimeOptions:
    """How the lean kernels run; see the module docstring. Build with :meth:`resolve`."""

    compile: bool = True
    compile_auto: bool = False  # compile was decided by "auto" (said in the run header)
    half_matmul: str = "auto"  # auto | native | fp32
    slow_bf16_gemm: bool = False  # the CPU fact "auto" decides from (read once by resolve)
    # the tokens every row of a batch starts with run once (lorafit.train.loss); off: each row runs whole
    shared_prefix: bool = True

    def __post_init__(self):
        if self.half_matmul not in HALF_MATMUL_MODES:
            raise LorafitError(f"half_matmul: got {self.half_matmul!r}, use one of: {', '.join(HALF_MATMUL_MODES)}")

    @classmethod
    def resolve(cls, compile: bool | str | None = None, half_matmul: str | None = None,
                env: Mapping[str, str] | None = None, planned_tokens: int | None = None,
                shared_prefix: bool | None = None) -> RuntimeOptions:
        """Options from explicit values (the config), else the environment, else the defaults. ``compile``
        ``"auto"`` (the default) decides from ``planned_tokens`` (:func:`compile_pays`)."""
        env = os.environ if env is None else env
        if compile is None:
            value = (env.get(ENV_COMPILE) or "auto").strip().lower()
            compile = "auto" if value == "auto" else _env_bool(env, ENV_COMPILE, True)
        auto = compile == "auto"
        if auto:
            compile = compile_pays(planned_tokens)
        if half_matmul is None:
            half_matmul = (env.get(ENV_HALF_MATMUL) or "auto").strip().lower() or "auto"
            if half_matmul not in HALF_MATMUL_MODES:
                raise LorafitError(f"{ENV_HALF_MATMUL}={half_matmul!r}: use one of {', '.join(HALF_MATMUL_MODES)}")
        if shared_prefix is None:
            shared_prefix = _env_bool(env, ENV_SHARED_PREFIX, True)
        return cls(compile=bool(compile), compile_auto=auto, half_matmul=half_matmul,
                   slow_bf16_gemm=cpu_has_slow_bf16_gemm(), shared_prefix=bool(shared_prefix))

    # ---- the rules (dtype and device by name: "bfloat16", "cpu") -----------------------------------------
    def upcasts(self, dtype: str, device: str, rows: int | None = None) -> bool:
        """Whether frozen GEMMs over tensors stored in ``dtype`` run on fp32 copies on ``device``. ``rows``: the
        GEMM's rows (tokens), if known; fewer than ``MIN_ROWS`` stay native in ``auto``."""
        if dtype not in HALF_DTYPES or device != "cpu":
            return False  # fp32 already, or a GPU: its half-precision GEMMs are the fast ones
        if self.half_matmul != "auto":
            return self.half_matmul == "fp32"
        return self.slow_bf16_gemm and (rows is None or rows >= MIN_ROWS)

    def matmul_dtype(self, dtype: str, device: str, rows: int | None = None) -> str:
        return "float32" if self.upcasts(dtype, device, rows) else dtype

    def head_copy_allowed(self, numel: int) -> bool:
        """Whether a (vocab × hidden) head of ``numel`` elements may be copied to fp32: under the cap, or forced."""
        return self.half_matmul == "fp32" or 4 * numel <= HEAD_COPY_MAX_BYTES

    def upcasts_head(self, dtype: str, device: str, rows: int, numel: int) -> bool:
        """Whether the chunked loss copies a frozen (vocab × hidden) head of ``numel`` elements to fp32."""
        return self.upcasts(dtype, device, rows) and self.head_copy_allowed(numel)

    def describe(self) -> str:
        """One line for a run header."""
        half = {"auto": "auto (fp32 copies on this CPU)" if self.slow_bf16_gemm else "auto (native on this CPU)",
                "native": "native", "fp32": "fp32 copies"}[self.half_matmul]
        kernels = "compiled" if self.compile else "eager"
        if self.compile_auto:
            kernels += " (auto: a run this long repays compiling)" if self.compile else \
                " (auto: a run this short would not repay compiling)"
        prefix = "" if self.shared_prefix else ", shared prefix off"
        return f"kernels {kernels}, bf16 matmuls {half}{prefix}"

    def to_dict(self) -> dict:
        return asdict(self)


def loss_chunk_tokens(vocab_size: int, chunk_elements: int = LOSS_CHUNK_ELEMENTS) -> int:
    """Tokens per chunk of the chunked loss for a vocabulary of ``vocab_size`` (at least 16)."""
    return max(16, chunk_elements // max(vocab_size, 1))
