"""LoRA layers that read the same input (q/k/v of an attention block, gate/up of an MLP) as one autograd function.

Why: one by one, each layer's backward writes its own gradient of the shared input (``g W`` plus its masked
LoRA part, a pass over memory each) and autograd then adds them up, one more pass per extra layer; forward
reads the input once per layer to apply that layer's dropout. On CPU these passes, not arithmetic, are what
the elementwise work costs. As a group, forward applies every member's dropout in one pass over ``x``, and
backward accumulates the members' ``g W`` into one tensor (GEMMs with β = 1), then adds every masked LoRA part
and writes each member's dropped-out input in one more pass. Same math, same masks: the seeds are drawn in the
order the layers would draw them one by one.

Transformers' attention calls ``q_proj(x)``, ``k_proj(x)``, ``v_proj(x)`` in turn: the first member's call
computes the whole group and keeps the other outputs; each other member then takes its own, provided it is
called next on the very same, unmodified tensor. Where siblings read different tensors, the first miss turns
the group off (that forward's k/v are computed twice and draw fresh seeds; after that the layers run one by
one). Hooks on the later members see their calls but not the compute.
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import nn

from lorafit.lora import dropout as lora_dropout
from lorafit.lora.layer import LoraLinear, branch_grads, compute_dtype_for, lora_forward, to_compute

_FIELDS = 5  # per member: weight (out × in), bias, A, B, scaling


class LoraGroupFunction(torch.autograd.Function):
    """Outputs of LoRA layers ``x Wᵢᵀ + bᵢ + sᵢ · (drop_i(x) Aᵢᵀ) Bᵢᵀ`` sharing ``x`` and a dropout ``p``; frozen
    bases. Saves what the layers would one by one: ``x`` (once), the weights by reference, each ``x Aᵢᵀ`` and
    each dropout seed."""

    @staticmethod
    def forward(ctx, x, p: float, *members):
        ms = [members[i:i + _FIELDS] for i in range(0, len(members), _FIELDS)]
        cd = compute_dtype_for(x, ms[0][0])  # fp32 where bf16 GEMMs are slow (see lorafit.matmul)
        x2 = x.reshape(-1, x.shape[-1]).to(cd)  # one copy for the whole group, if any
        seeds = tuple(lora_dropout.new_seed(x.device) for _ in ms) if p > 0 else None
        xds = list(lora_dropout.dropped_each(x2, seed=seeds, p=p)) if seeds else None
        outs, xas = [], []
        for i, (w, b, a, bb, s) in enumerate(ms):
            dropped = None
            if seeds:
                dropped, xds[i] = [xds[i], seeds[i]], None  # lora_forward frees it once A has read it
            y, xa, _ = lora_forward(x2, w, b, a, bb, s, p, cd, dropped)  # copies the weight to cd if need be
            outs.append(y.to(x.dtype).view(*x.shape[:-1], y.shape[-1]))
            xas.append(xa)
        ctx.p, ctx.n, ctx.compute_dtype = p, len(ms), cd
        ctx.scalings = [m[4] for m in ms]
        ctx.has_bias = [m[1] is not None for m in ms]
        ctx.save_for_backward(x, *(t for m in ms for t in (m[0], m[2], m[3])), *xas, *(seeds or ()))
        ctx.set_materialize_grads(False)  # a member whose output is unused gets None: skipped in backward
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        n, p, cd = ctx.n, ctx.p, ctx.compute_dtype
        x, *saved = ctx.saved_tensors
        weights, lora_as, lora_bs = saved[0:3 * n:3], saved[1:3 * n:3], saved[2:3 * n:3]
        xas, seeds = saved[3 * n:4 * n], tuple(saved[4 * n:]) or None
        needs = ctx.needs_input_grad
        need_x = needs[0]
        result: list = [None] * (2 + _FIELDS * n)  # x, p, then per member: weight, bias, A, B, scaling
        base, lows, g_xas = None, {}, {}
        for i in (i for i in range(n) if grads[i] is not None):
            need_bias, need_a, need_b = (needs[2 + _FIELDS * i + k] for k in (1, 2, 3))
            g = to_compute(cd, grads[i].reshape(-1, grads[i].shape[-1]))[0]
            g_xa, result[2 + _FIELDS * i + 3] = branch_grads(g, lora_bs[i], xas[i], ctx.scalings[i], p,
                                                             seeds is not None, need_b)
            if need_a:
                g_xas[i] = g_xa
            if need_bias and ctx.has_bias[i]:
                result[2 + _FIELDS * i + 1] = g.sum(0).to(x.dtype)
            if need_x:
                w = to_compute(cd, weights[i])[0]
                base = g @ w if base is None else base.addmm_(g, w)
                if seeds:
                    lows[i] = g_xa @ lora_as[i].to(cd)
                else:
                    base.addmm_(g_xa, lora_as[i].to(cd))
                del w
            del g  # before the next member's copies
        x2 = x.reshape(-1, x.shape[-1])
        if g_xas:
            x2 = x2.to(cd)
        xds = {i: x2 for i in g_xas}
        if seeds and lows:  # one pass: x's gradient and every dropped-out input
            *dropped, base = lora_dropout.dropped_each_and_add(
                x2, base, tuple(lows.values()), seed=tuple(seeds[i] for i in lows), p=p)
            xds = dict(zip(lows, dropped, strict=True))
            del lows, dropped
        elif seeds and g_xas:
            xds = dict(zip(g_xas, lora_dropout.dropped_each(x2, seed=tuple(seeds[i] for i in g_xas), p=p),
                           strict=True))
        for i in g_xas:
            result[2 + _FIELDS * i + 2] = (g_xas[i].t() @ xds.pop(i)).to(lora_as[i].dtype)
        if need_x and base is not None:
            result[0] = base.to(x.dtype).view(x.shape)
        return tuple(result)


class SharedInput:
    """The LoRA layers of one block that read the same tensor, run together (see the module docstring).

    The first member's call computes the group; each other member takes its output if called next on the very
    same, unmodified tensor. A member called on anything else (a model whose siblings read different tensors)
    or not called at all turns the group off for good: it then computes alone, as do all of them from then on.
    Holds its layers by weak reference (they hold it), so a model is still freed by reference counting.
    """

    def __init__(self, layers: list[LoraLinear]):
        self._layers = [weakref.ref(m) for m in layers]
        self.active = True
        self._pending: list[tuple] = []  # (layer, x, x's version, output) for the members not yet called

    @property
    def layers(self) -> list[LoraLinear]:
        return [r() for r in self._layers]

    def _runnable(self, layers, x: torch.Tensor) -> bool:
        if not (self.active and torch.is_grad_enabled()):
            return False
        return all(
            m is not None and m.training and not (m.merged or m.disabled) and not m.base_layer.weight.requires_grad
            and m.base_layer.weight.dtype == x.dtype and m.dropout_p == layers[0].dropout_p
            for m in layers)

    def _off(self) -> None:
        self.active = False
        self._pending = []

    def __call__(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor | None:
        """``layer``'s output, or None when ``layer`` should compute alone."""
        layers = self.layers
        if layer is layers[0]:
            if self._pending:  # a member was not called since the last group: its siblings read something else
                self._off()
            if not self._runnable(layers, x):
                return None
            args = [t for m in layers for t in m.function_args()[:5]]
            outs = LoraGroupFunction.apply(x, layers[0].dropout_p, *args)
            self._pending = [(m, x, x._version, y) for m, y in zip(layers[1:], outs[1:], strict=True)]
            return outs[0]
        if not self._pending:
            return None
        m, px, version, y = self._pending.pop(0)
        if m is layer and px is x and version == x._version:
            return y
        self._off()
        return None

    def __deepcopy__(self, memo):
        new = SharedInput.__new__(SharedInput)
        memo[id(self)] = new
        new._layers = [weakref.ref(copy.deepcopy(m, memo)) for m in self.layers]
        new.active, new._pending = self.active, []
        return new

    def __getstate__(self):  # pickling: strong references (weak ones cannot be pickled)
        return {"layers": self.layers, "active": self.active}

    def __setstate__(self, state):
        self._layers = [weakref.ref(m) for m in state["layers"]]
        self.active, self._pending = state["active"], []


# Sibling projections that read the same tensor in transformers' attention blocks and gated MLPs.
_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def use_shared_input_groups(model: nn.Module) -> int:
    """Group the LoRA q/k/v and gate/up projections of every block of ``model`` (in place); returns how many
    groups."""
    count = 0
    for module in model.modules():
        for names in _GROUPS:
            layers = [getattr(module, n, None) for n in names]
            if not all(isinstance(m, LoraLinear) and not m.fan_in_fan_out for m in layers):
                continue
            if len({m.in_features for m in layers}) != 1:
                continue
            group = SharedInput(layers)
            for m in layers:
                m.group = group
            count += 1
    return count
