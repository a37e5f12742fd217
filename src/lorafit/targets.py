"""Which modules a LoRA adapter wraps: the one matcher, on dotted module paths. Imports no torch.

``lorafit.lora`` applies it to a live model's ``named_modules()``; ``lorafit.memory`` applies it to the module
paths a :class:`~lorafit.memory.spec.ModelSpec` lays out. Same rules, so a target set trains and is estimated
on the same layers. The rules are PEFT's:

* ``target_modules`` a list of names: a module matches when its path equals a name or ends with ``"." + name``;
* a string other than ``"all-linear"``: a regex that must match the *whole* path (``re.fullmatch``);
* ``"all-linear"``: every linear layer but the output head;
* ``layers_to_transform``: only modules inside those decoder blocks (``…layers.3.…``, ``…h.3.…``);
* ``rank_pattern`` / ``alpha_pattern``: the first key that matches the end of the path (``(.*\\.)?key$``)
  overrides ``r`` / ``alpha``.
"""

from __future__ import annotations

import re

ALL_LINEAR = "all-linear"
# Names of the containers that hold the repeated blocks (``model.layers.3``, ``transformer.h.3`` …), as in PEFT.
_LAYER_INDEX = re.compile(r".*\.(?:layers|h|block|blocks|layer)\.(\d+)(?:\.|$)")


def layer_index(path: str) -> int | None:
    """The decoder block a module path lies in (``model.layers.3.mlp.up_proj`` → 3), or None."""
    m = _LAYER_INDEX.match(path)
    return int(m.group(1)) if m else None


def name_matches(path: str, targets: list[str] | str, heads: set[str] = frozenset()) -> bool:
    """Whether ``path`` is selected by ``targets`` (names, a full-path regex, or ``"all-linear"``, which leaves
    out ``heads``). For ``"all-linear"`` the caller checks that the module is a linear layer."""
    if targets == ALL_LINEAR:
        return path not in heads
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def layer_allowed(path: str, layers: list[int] | None) -> bool:
    return layers is None or layer_index(path) in layers


def selected(path: str, targets: list[str] | str, layers: list[int] | None = None,
             heads: set[str] = frozenset()) -> bool:
    """``path`` matches ``targets`` and lies in one of ``layers`` (all when None)."""
    return name_matches(path, targets, heads) and layer_allowed(path, layers)


def unmatched_names(targets: list[str] | str, paths: list[str]) -> list[str]:
    """Entries of a name list that match none of ``paths`` (a regex or ``"all-linear"``: none)."""
    if isinstance(targets, str):
        return []
    return [t for t in targets if not any(p == t or p.endswith("." + t) for p in paths)]


def pattern_value(patterns: dict, path: str, default):
    """PEFT's rule for ``rank_pattern`` / ``alpha_pattern``: the first key matching the end of ``path``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default
