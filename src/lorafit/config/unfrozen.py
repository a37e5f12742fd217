"""The patterns of axolotl's ``unfrozen_parameters``, as axolotl reads them (``freeze_layers_except``).

A pattern is a regular expression matched at the start of a parameter's name (``re.match``), in which a dot is a
literal dot unless it is followed by ``+``; an optional ``[start:end]`` (or ``[index]``) at the end names rows of
the tensor's first dimension. Read here, without torch, so a config's bad pattern is refused when it loads;
:mod:`lorafit.train.freeze` applies them to a model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lorafit.errors import LorafitError

_RANGE = re.compile(r"^(.+)\[([0-9]*)(?::([0-9]*))?\]$")


@dataclass(frozen=True)
class Pattern:
    """One entry of ``unfrozen_parameters``: the name's regular expression and the optional row range."""

    raw: str
    regex: re.Pattern
    start: int | None = None  # rows [start, end) of the first dimension; None: the whole tensor
    end: int | None = None

    @classmethod
    def parse(cls, raw: str) -> Pattern:
        """The pattern as axolotl reads it; a bad expression or range raises ``ValueError`` naming it."""
        text, start, end = raw, None, None
        m = _RANGE.match(raw)
        if m:
            text, first, last = m.groups()
            if last is None and first.isdecimal():  # [index]: one row
                start, end = int(first), int(first) + 1
            else:  # [start:end], [:end], [start:] (and, as in axolotl, [] for every row)
                start, end = int(first or 0), int(last) if last else None
                if end is not None and start >= end:
                    raise ValueError(f"{raw!r}: the range's end must be greater than its start")
        try:
            regex = re.compile(re.sub(r"\.(?!\+)", r"\\.", text))
        except re.error as e:
            raise ValueError(f"{raw!r} is not a regular expression ({e})") from None
        return cls(raw, regex, start, end)

    def rows(self, n: int) -> tuple[int, int] | None:
        """The row range in a tensor of ``n`` rows, None for all of them; an impossible range raises."""
        if self.start is None:
            return None
        end = n if self.end is None else self.end
        if not 0 <= self.start < end <= n:
            raise LorafitError(f"unfrozen_parameters {self.raw!r}: rows {self.start}:{end} do not fit a tensor of "
                               f"{n} rows")
        return self.start, end
