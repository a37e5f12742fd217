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
called on the very same, unmodified tensor (else it computes alone, which is still correct).
"""

from __future__ import annotations

import torch
from torch import nn

from lorafit.lora import dropout as lora_dropout
from lorafit.lora.layer import LoraLinear, compute_dtype_for, lora_forward, to_compute

_FIELDS = 5  # per member: weight (out × in), bias, A, B, scaling


class LoraGroupFunction(torch.autograd.Function):
    """Outputs of LoRA layers ``x Wᵢᵀ + bᵢ + sᵢ · (drop_i(x) Aᵢᵀ) Bᵢᵀ`` sharing ``x`` and a dropout ``p``; frozen
    bases. Saves ``x`` once, each ``x Aᵢᵀ`` and each dropout seed, as the layers would one by one."""

    @staticmethod
    def forward(ctx, x, p: float, *members):
        ms = [members[i:i + _FIELDS] for i in range(0, len(members), _FIELDS)]
        cd = compute_dtype_for(x, ms[0][0])  # fp32 where bf16 GEMMs are slow (see lorafit.matmul)
        x2 = x.reshape(-1, x.shape[-1]).to(cd)  # one copy for the whole group, if any
        seeds = tuple(lora_dropout.new_seed(x.device) for _ in ms) if p > 0 else None
        xds = lora_dropout.dropped_each(x2, seed=seeds, p=p) if seeds else (None,) * len(ms)
        outs, xas = [], []
        for (w, b, a, bb, s), xd, seed in zip(ms, xds, seeds or xds, strict=True):
            w, b = to_compute(cd, w, b)
            y, xa, _ = lora_forward(x2, w, b, a, bb, s, p, cd, None if seed is None else (xd, seed))
            outs.append(y.to(x.dtype).view(*x.shape[:-1], y.shape[-1]))
            xas.append(xa)
            del w, b, y, xd  # before the next member's copies (fp32 weight copies can be large)
        del xds
        ctx.p, ctx.n, ctx.compute_dtype = p, len(ms), cd
        ctx.scalings = [m[4] for m in ms]
        ctx.has_bias = [m[1] is not None for m in ms]
        ctx.save_for_backward(x, *(t for m in ms for t in (m[0], m[2], m[3])), *xas, *(seeds or ()))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        n, p, cd = ctx.n, ctx.p, ctx.compute_dtype
        x, *saved = ctx.saved_tensors
        weights, lora_as, lora_bs = saved[0:3 * n:3], saved[1:3 * n:3], saved[2:3 * n:3]
        xas, seeds = saved[3 * n:4 * n], tuple(saved[4 * n:]) or None
        needs = ctx.needs_input_grad
        need_x = needs[0]
        result: list = [None, None]
        base, lows, g_xas = None, [], []
        for i in range(n):
            need_bias, need_a, need_b = (needs[2 + _FIELDS * i + k] for k in (1, 2, 3))
            g = to_compute(cd, grads[i].reshape(-1, grads[i].shape[-1]))[0]
            a, b = lora_as[i].to(cd), lora_bs[i].to(cd)
            s = ctx.scalings[i]
            # gradient reaching drop(x)·Aᵀ, with dropout's 1/(1-p) folded in while it is small (N × r)
            g_xa = (g @ b).mul_(s / (1.0 - p) if seeds else s)
            g_xas.append(g_xa if need_a else None)
            grad_b = (xas[i].t() @ g).t().mul_(s).to(lora_bs[i].dtype) if need_b else None
            grad_bias = g.sum(0).to(x.dtype) if need_bias and ctx.has_bias[i] else None
            result += [None, grad_bias, None, grad_b, None]  # weight, bias, A (below), B, scaling
            if need_x:
                w = to_compute(cd, weights[i])[0]
                base = g @ w if base is None else base.addmm_(g, w)
                if seeds:
                    lows.append(g_xa @ a)
                else:
                    base.addmm_(g_xa, a)
                del w
            del g  # before the next member's copies
        x2 = x.reshape(-1, x.shape[-1])
        if any(t is not None for t in g_xas):
            x2 = x2.to(cd)
        if seeds and need_x:
            *xds, base = lora_dropout.dropped_each_and_add(x2, base, tuple(lows), seed=seeds, p=p)
        elif seeds and any(t is not None for t in g_xas):
            xds = lora_dropout.dropped_each(x2, seed=seeds, p=p)
        else:
            xds = [x2] * n
        for i, g_xa in enumerate(g_xas):
            if g_xa is not None:
                result[2 + _FIELDS * i + 2] = (g_xa.t() @ xds[i]).to(lora_as[i].dtype)
        if need_x:
            result[0] = base.to(x.dtype).view(x.shape)
        return tuple(result)


class SharedInput:
    """The LoRA layers of one block that read the same tensor, run together (see the module docstring)."""

    def __init__(self, layers: list[LoraLinear]):
        self.layers = layers
        self._pending: list[tuple] = []  # (layer, x, x's version, output) for the members not yet called

    def _runnable(self, x: torch.Tensor) -> bool:
        if not torch.is_grad_enabled():
            return False
        first = self.layers[0]
        return all(
            m.training and not (m.merged or m.disabled) and not m.base_layer.weight.requires_grad
            and m.base_layer.weight.dtype == x.dtype and m.dropout_p == first.dropout_p
            for m in self.layers)

    def __call__(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor | None:
        """``layer``'s output, or None when ``layer`` should compute alone."""
        if layer is self.layers[0]:
            self._pending = []
            if not self._runnable(x):
                return None
            args = [t for m in self.layers for t in m.function_args()[:5]]
            outs = LoraGroupFunction.apply(x, self.layers[0].dropout_p, *args)
            self._pending = [(m, x, x._version, y) for m, y in zip(self.layers[1:], outs[1:], strict=True)]
            return outs[0]
        for k, (m, px, version, y) in enumerate(self._pending):
            if m is layer:
                del self._pending[k]
                return y if px is x and version == x._version else None
        return None


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
