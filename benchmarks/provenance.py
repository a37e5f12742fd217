"""What a benchmark result depends on besides the code path it measures: one dict for every results JSON.

    from provenance import provenance            # a script in benchmarks/ (its folder is on sys.path)
    payload["provenance"] = provenance(options)  # options: the RuntimeOptions the run used (None: resolved
                                                 # here from the environment, as a run without a config does)
    payload["provenance"] = provenance(threads=2)  # workers that set their own torch thread count

Records the git commit (and whether the working tree differs from it), the CPU's model name and the flags that
change what a step computes or how fast (AVX2, AVX-512, AVX-512 BF16, AMX), torch's thread count, the Python /
torch / transformers / peft versions, and every lorafit runtime option in force: the resolved
:class:`lorafit.options.RuntimeOptions`, what it decides for a bf16 model on this CPU, the environment
variables it falls back to (``LORAFIT_COMPILE``, ``LORAFIT_HALF_MATMUL``) and the fixed thresholds of
:mod:`lorafit.options`.

Cheap: importing this module imports nothing heavy; :func:`provenance` imports torch only to read its thread
count and CPU capability (every caller has imported it already, or is about to run children that do) and reads
package versions from their metadata, without importing transformers or peft.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The CPU flags that decide lorafit's bf16 matmul rule (lorafit.options) or the speed of a bf16 / fp32 GEMM.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
ENV_VARS = ("LORAFIT_COMPILE", "LORAFIT_HALF_MATMUL", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
PACKAGES = ("torch", "transformers", "peft", "accelerate", "safetensors")
MAX_CHANGED = 50  # changed paths listed in the record (the count is always exact)


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def git_info() -> dict:
    """The checked-out commit and the working tree's differences from it (None where git is unavailable)."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "changed": [], "n_changed": None}
    # --no-optional-locks: read-only, never takes the index lock (another git command may be running)
    status = _git("--no-optional-locks", "status", "--porcelain", "--untracked-files=normal") or ""
    changed = [line[3:] for line in status.splitlines() if line.strip()]
    return {"commit": commit.strip(), "dirty": bool(changed), "n_changed": len(changed),
            "changed": changed[:MAX_CHANGED]}


def cpu_info() -> dict:
    """The CPU's model name, the flags in :data:`CPU_FLAGS` (booleans; all False where /proc/cpuinfo is absent)."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not name:
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
                if name and flags:
                    break
    except OSError:
        pass
    return {"model": name or platform.processor() or platform.machine(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else None, "flags": {f: f in flags for f in CPU_FLAGS}}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch"] = torch.__version__  # the imported build wins over the metadata (an editable torch)
    try:
        import lorafit

        out["lorafit"] = lorafit.__version__
        out["lorafit_path"] = str(Path(lorafit.__file__).resolve().parent)  # which checkout's src was imported
    except ImportError:
        out["lorafit"] = None
    return out


def runtime_info(options=None) -> dict:
    """The lorafit runtime options in force: ``options`` (a RuntimeOptions or its ``to_dict()``), else those
    resolved from the environment, with what they decide and the constants they decide with."""
    from lorafit import options as lo

    per_run = options is None  # each measured run resolves its own (compile "auto" decides from its length)
    if options is None:
        options = lo.RuntimeOptions.resolve()
    elif isinstance(options, dict):
        options = lo.RuntimeOptions(**options)
    describe = options.describe()
    if per_run and options.compile_auto:
        describe = describe.replace(describe.split(", bf16")[0], "kernels auto (each run compiles from "
                                    f"{lo.COMPILE_MIN_TOKENS:,} planned tokens; see its own record)")
    return {
        **options.to_dict(),
        "describe": describe,
        "bf16_matmuls_on_fp32_copies": options.upcasts("bfloat16", "cpu"),  # at >= MIN_ROWS rows, on this CPU
        "constants": {"MIN_ROWS": lo.MIN_ROWS, "HEAD_COPY_MAX_BYTES": lo.HEAD_COPY_MAX_BYTES,
                      "COMPILE_MIN_TOKENS": lo.COMPILE_MIN_TOKENS,
                      "LOSS_CHUNK_ELEMENTS": lo.LOSS_CHUNK_ELEMENTS},
    }


def torch_info() -> dict:
    import torch

    out = {"num_threads": torch.get_num_threads(), "num_interop_threads": torch.get_num_interop_threads(),
           "cpu_capability": None, "cuda": torch.cuda.is_available(), "gpu": None}
    try:
        out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        pass
    if out["cuda"]:
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def provenance(options=None, threads: int | None = None) -> dict:
    """Everything a results file needs to say where its numbers came from (see the module docstring).

    ``options``: the lorafit RuntimeOptions the measured runs used (or its ``to_dict()``); None: resolved from
    the environment, as every run without ``compile_kernels`` / ``half_matmul`` in its config does.
    ``threads``: the torch threads the measured processes run with, where that is not this process's count
    (``torch`` still records this process's own).
    """
    t = torch_info()
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": git_info(),
        "cpu": cpu_info(),
        "threads": threads if threads is not None else t["num_threads"],
        "torch": t,
        "versions": versions(),
        "runtime_options": runtime_info(options),
        "env": {k: os.environ.get(k) for k in ENV_VARS},
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else [],
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(provenance(), indent=1))
