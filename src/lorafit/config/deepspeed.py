"""axolotl's ``deepspeed`` key, read for the one thing lorafit takes from it: the ZeRO stage.

lorafit does not run DeepSpeed. Under torchrun it shards with torch's own FSDP2 or replicates with DDP, and a
DeepSpeed config maps onto them by what its stage shards: ZeRO-3 (parameters, gradients and optimizer states)
is FSDP2's full sharding; ZeRO-1/2 (optimizer states, gradients) is DDP here, since an adapter's optimizer
states and gradients are a few MB a rank and sharding them saves next to nothing. The stage is read from the
JSON file (or the inline mapping); a file that is not there is read by its name when it is one of the configs
axolotl ships (``deepspeed_configs/zero1.json`` … ``zero3_bf16_cpuoffload_all.json``), as example configs name
them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

_SHIPPED = re.compile(r"^zero([0-3])(_[a-z0-9_]+)?\.json$")


def read(value: str | dict[str, Any], resolve) -> tuple[int, str, bool]:
    """``(stage, where it was read, whether it offloads)`` of a ``deepspeed`` value: a path (``resolve`` makes it
    absolute, relative to the config) or the config mapping itself; a file is read once. Raises ``ValueError``
    with the fix when there is no stage."""
    if isinstance(value, dict):
        return _stage_of(value, "the inline deepspeed config"), "the inline config", _offloads(value)
    path = resolve(value)
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"key 'deepspeed': got {value!r}, not a readable JSON file ({e})") from None
        return _stage_of(data, str(value)), str(value), _offloads(data)
    name = Path(value).name
    shipped = _SHIPPED.match(name)
    if shipped:
        return int(shipped.group(1)), f"the name of axolotl's shipped {name} (the file is not here)", "offload" in name
    raise ValueError(f"key 'deepspeed': got {value!r}, no such file; lorafit reads only its ZeRO stage "
                     "(zero_optimization.stage): give the file, or remove the key and set fsdp_version: 2 to shard "
                     "with FSDP2")


def _stage_of(data: Any, where: str) -> int:
    stage = data.get("zero_optimization", {}).get("stage") if isinstance(data, dict) else None
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"key 'deepspeed': {where} has no zero_optimization.stage 0-3 (got {stage!r})")
    return stage


def _offloads(data: dict[str, Any]) -> bool:
    """Whether a DeepSpeed config offloads parameters or optimizer states."""
    zero = data.get("zero_optimization", {})
    return any(isinstance(o, dict) and o.get("device", "none") != "none"
               for o in (zero.get("offload_param"), zero.get("offload_optimizer")))


def notice(stage: int, where: str, offload: bool) -> str:
    """What the run does instead of DeepSpeed, in one line."""
    mapped = ("FSDP2, the sharding of parameters, gradients and optimizer states ZeRO-3 does" if stage == 3 else
              "DDP: an adapter's optimizer states and gradients are small, so ZeRO's sharding of them saves little")
    extra = "; its offload settings are not applied (lorafit plan shows what fits)" if offload else ""
    return (f"deepspeed: ZeRO-{stage}, read from {where}: lorafit does not run DeepSpeed; under torchrun it trains with "
            f"{mapped}{extra}")
