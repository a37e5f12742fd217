"""Turning a pydantic validation error into one line: ``file: key 'a.b': got X, must be Y``."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import ValidationError


def kind(v: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(v), type(v).__name__
    )


def show(v: Any) -> str:
    s = repr(v) if isinstance(v, str) else yaml.safe_dump(v, default_flow_style=True).strip()
    if s.endswith("\n...") or s.endswith(" ..."):
        s = s[:-4].strip()
    s = s.replace("\n", " ")
    return s if len(s) <= 60 else s[:57] + "..."


def _loc_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


_TYPE_WORDS = {
    "int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
    "list": "a list", "dict": "a mapping",
}


def one_line(err: ValidationError, source: str, data: dict, allowed: dict[str, str]) -> str:
    """The first pydantic error as ``file: key 'a.b': got X, must be Y`` (``allowed``: what each constrained key
    allows, as the message words it)."""
    e = err.errors(include_url=False)[0]
    loc = tuple(p for p in e["loc"] if p not in ("function-after", "function-before"))
    # drop union-branch markers such as 'int' / 'float' / 'literal[...]' / 'str' that pydantic appends
    loc = tuple(p for p in loc if not (isinstance(p, str) and (p in _TYPE_WORDS or p.startswith(("literal[",
                "list[", "dict[", "str", "bool", "int", "float", "function")))))
    path = _loc_path(loc)
    leaf = next((p for p in reversed(loc) if isinstance(p, str)), "")
    etype = e["type"]
    msg = e["msg"]
    if etype == "value_error":
        msg = msg.removeprefix("Value error, ")
        if not loc:  # model-level check: the message names the keys itself
            return f"{source}: {msg}"
        what = msg if msg.startswith(("must", "not", "is ")) or "supported" in msg else f"must be {msg}"
    elif etype == "missing":
        return f"{source}: key '{path}' is required" + (
            "" if leaf != "datasets" else " (a list of {path, type} entries)")
    elif leaf in allowed:
        what = f"must be {allowed[leaf]}"
    elif etype == "literal_error":
        what = f"must be one of: {e.get('ctx', {}).get('expected', '')}".replace("'", "")
    else:
        base = etype.split("_")[0]
        what = f"must be {_TYPE_WORDS[base]}" if base in _TYPE_WORDS else msg[0].lower() + msg[1:]
    got = _lookup(data, loc)
    return f"{source}: key '{path}': got {show(got)}, {what}"


def _lookup(data: Any, loc: tuple) -> Any:
    cur = data
    for part in loc:
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and part < len(cur):
            cur = cur[part]
        else:
            return "(missing)"
    return cur
