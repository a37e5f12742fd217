"""The one dtype table: names a user may write, their canonical name, bytes per element. Imports no torch."""

from __future__ import annotations

from lorafit.errors import LorafitError

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ALIASES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def canonical(name, what: str = "dtype") -> str:
    """``"bf16"`` → ``"bfloat16"`` (a torch dtype is accepted too); anything else is a one-line error."""
    key = str(name).lower().removeprefix("torch.")
    try:
        return ALIASES[key]
    except KeyError:
        raise LorafitError(f"{what}: got {name!r}, use one of: float32, bfloat16, float16") from None

