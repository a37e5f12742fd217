"""Which dtype the frozen matmuls compute in: :mod:`lorafit.options`' rule, on torch tensors.

The rule (fp32 copies of bf16 operands on an x86 CPU without AMX, where they are faster; see
:mod:`lorafit.options`) is written once, torch-free, so the memory estimator applies the very same one; this
module only turns torch dtypes and devices into the names the rule takes, and copies tensors.
"""

from __future__ import annotations

import torch

from lorafit.options import RuntimeOptions


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def compute_dtype(options: RuntimeOptions, dtype: torch.dtype, device: torch.device | str,
                  rows: int | None = None) -> torch.dtype:
    """The dtype frozen GEMMs over tensors stored in ``dtype`` run in on ``device``: ``dtype`` or fp32."""
    return torch.float32 if options.upcasts(_name(dtype), torch.device(device).type, rows) else dtype


def upcasts(options: RuntimeOptions, dtype: torch.dtype, device: torch.device | str, rows: int | None = None) -> bool:
    return options.upcasts(_name(dtype), torch.device(device).type, rows)


def upcasts_head(options: RuntimeOptions, dtype: torch.dtype, device: torch.device | str, rows: int,
                 numel: int) -> bool:
    """Whether the loss copies a frozen (vocab × hidden) head of ``numel`` elements to fp32."""
    return options.upcasts_head(_name(dtype), torch.device(device).type, rows, numel)


def to_compute(dtype: torch.dtype, *tensors):
    """``tensors`` (None kept) in the matmuls' ``dtype``: fp32 copies of bf16 ones where the rule says so."""
    return tuple(None if t is None else t.to(dtype) for t in tensors)
