"""Full fine-tuning of part of a model: axolotl's ``unfrozen_parameters``.

Every parameter is frozen except those whose name matches one of the patterns (read as axolotl reads them:
:mod:`lorafit.config.unfrozen`). A pattern ending in a row range trains only those rows of the first dimension:
the other rows' gradients are zeroed, so only those rows move (weight decay, as in axolotl, still applies to the
whole tensor). ``^model.embed_tokens.weight$[32000:]`` trains only the embeddings of tokens added after the first
32,000.

A tied tensor (input embeddings shared with the head) matches under either of its names.
"""

from __future__ import annotations

from torch import nn

from lorafit.config.unfrozen import Pattern
from lorafit.errors import LorafitError


def freeze_except(model: nn.Module, patterns: list[str]) -> list[str]:
    """Freeze every parameter of ``model`` but those ``patterns`` select (row ranges through a gradient hook);
    returns the names left trainable. No match at all is an error naming a parameter, to show how names look."""
    parsed = [Pattern.parse(p) for p in patterns]
    names: dict[nn.Parameter, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(p, []).append(name)
    trained = []
    for p, aliases in names.items():
        hits = [pat for pat in parsed if any(pat.regex.match(n) for n in aliases)]
        p.requires_grad_(bool(hits))
        if not hits:
            continue
        trained.append(aliases[0])
        ranges = [pat.rows(p.shape[0]) for pat in hits]
        if None not in ranges:  # only some rows: the others' gradient is zeroed as it arrives
            p.register_hook(_keep_rows(sorted(ranges)))
    if not trained:
        example = next(iter(names.values()))[0] if names else "(the model has no parameters)"
        raise LorafitError(f"unfrozen_parameters {patterns}: no parameter of the model matches; names look like "
                           f"{example!r} (patterns match from the start of the name)")
    return trained


def _keep_rows(ranges: list[tuple[int, int]]):
    def hook(grad):
        keep = grad.new_zeros(grad.shape[0], dtype=bool)
        for start, end in ranges:
            keep[start:end] = True
        return grad * keep.view(-1, *([1] * (grad.dim() - 1)))
    return hook
