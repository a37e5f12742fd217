"""LoRA layers that read the same input (q/k/v of an attention block, gate/up of an MLP) as one autograd function.

Why: one by one, each layer's backward writes its own gradient of the shared input (``g W`` plus its masked
LoRA part, a pass over memory each) and autograd then adds them up, one more pass per extra layer; forward
reads the input once per layer to apply that layer's dropout. On CPU these passes, not arithmetic, are what
the elementwise work costs. As a group, forward applies every member's dropout in one pass over ``x``, and
backward accumulates the members' ``g W`` into one tensor (GEMMs with β = 1), then adds every masked LoRA part
and writes each member's dropped-out input in one more pass. Same math, same masks: the seeds are drawn in the
order the layers would draw them one by one.

Which modules form a group, and when a group may run, is :mod:`lorafit.lora.group`'s business; this module is
the math on tensors.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from lorafit.kernels import dropout, nf4
from lorafit.kernels.lora_branch import Branch, branch_forward, branch_grads, compute_dtype_for
from lorafit.kernels.matmul import to_compute
from lorafit.options import RuntimeOptions

# autograd takes tensors positionally: each member is passed as these five arguments, in this order
MEMBER_FIELDS = ("weight", "bias", "lora_a", "lora_b", "scaling")
_LEADING = 3  # x, dropout p, options


def flatten(branches: list[Branch]) -> list:
    """The members' operands in the order :meth:`LoraGroupFunction.forward` takes them."""
    return [getattr(b, f) for b in branches for f in MEMBER_FIELDS]


def _unflatten(flat: tuple, p: float) -> list[Branch]:
    k = len(MEMBER_FIELDS)
    return [Branch(*flat[i:i + k], dropout_p=p) for i in range(0, len(flat), k)]


class LoraGroupFunction(torch.autograd.Function):
    """Outputs of LoRA layers ``x Wᵢᵀ + bᵢ + sᵢ · (drop_i(x) Aᵢᵀ) Bᵢᵀ`` sharing ``x`` and a dropout ``p``; frozen
    bases. Saves what the layers would one by one: ``x`` (once), the weights by reference, each ``x Aᵢᵀ`` and
    each dropout seed. A 4-bit weight (QLoRA) is dequantized where it is used, one member at a time, in forward
    and again in backward; only the packed one is kept. Call as ``apply(x, p, options, *flatten(branches))``."""

    @staticmethod
    def forward(ctx, x, p: float, options: RuntimeOptions, *flat):
        branches = _unflatten(flat, p)
        cd = compute_dtype_for(options, x, branches[0].weight)  # fp32 where bf16 GEMMs are slow
        x2 = x.reshape(-1, x.shape[-1]).to(cd)  # one copy for the whole group, if any
        seeds = tuple(dropout.new_seed(x.device, options.compile) for _ in branches) if p > 0 else None
        xds = list(dropout.dropped_each(x2, seed=seeds, p=p)) if seeds else None
        outs, xas = [], []
        for i, br in enumerate(branches):
            dropped = None
            if seeds:
                dropped, xds[i] = [xds[i], seeds[i]], None  # branch_forward frees it once A has read it
            dense = replace(br, weight=nf4.dense(br.weight, x.dtype))
            y, saved = branch_forward(x2, dense, cd, options.compile, dropped)  # copies the weight to cd if need be
            del dense
            outs.append(y.to(x.dtype).view(*x.shape[:-1], y.shape[-1]))
            xas.append(saved.xa)
        ctx.p, ctx.n, ctx.compute_dtype = p, len(branches), cd
        ctx.scalings = [b.scaling for b in branches]
        ctx.has_bias = [b.bias is not None for b in branches]
        ctx.save_for_backward(x, *(t for b in branches for t in (b.weight, b.lora_a, b.lora_b)), *xas,
                              *(seeds or ()))
        ctx.set_materialize_grads(False)  # a member whose output is unused gets None: skipped in backward
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        n, p, cd = ctx.n, ctx.p, ctx.compute_dtype
        x, *saved = ctx.saved_tensors
        weights, lora_as, lora_bs = saved[0:3 * n:3], saved[1:3 * n:3], saved[2:3 * n:3]
        xas, seeds = saved[3 * n:4 * n], tuple(saved[4 * n:]) or None
        need_x = ctx.needs_input_grad[0]
        member_grads = [dict.fromkeys(MEMBER_FIELDS) for _ in range(n)]
        base, lows, g_xas = None, {}, {}
        for i in (i for i in range(n) if grads[i] is not None):
            first = _LEADING + len(MEMBER_FIELDS) * i
            needs = dict(zip(MEMBER_FIELDS, ctx.needs_input_grad[first:first + len(MEMBER_FIELDS)], strict=True))
            g = to_compute(cd, grads[i].reshape(-1, grads[i].shape[-1]))[0]
            g_xa, member_grads[i]["lora_b"] = branch_grads(g, lora_bs[i], xas[i], ctx.scalings[i], p,
                                                           seeds is not None, needs["lora_b"])
            if needs["lora_a"]:
                g_xas[i] = g_xa
            if needs["bias"] and ctx.has_bias[i]:
                member_grads[i]["bias"] = g.sum(0).to(x.dtype)
            if need_x:
                w = to_compute(cd, nf4.dense(weights[i], x.dtype))[0]
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
            *dropped, base = dropout.dropped_each_and_add(
                x2, base, tuple(lows.values()), seed=tuple(seeds[i] for i in lows), p=p)
            xds = dict(zip(lows, dropped, strict=True))
            del lows, dropped
        elif seeds and g_xas:
            xds = dict(zip(g_xas, dropout.dropped_each(x2, seed=tuple(seeds[i] for i in g_xas), p=p), strict=True))
        for i in g_xas:
            member_grads[i]["lora_a"] = (g_xas[i].t() @ xds.pop(i)).to(lora_as[i].dtype)
        grad_x = base.to(x.dtype).view(x.shape) if need_x and base is not None else None
        return grad_x, None, None, *(m[f] for m in member_grads for f in MEMBER_FIELDS)
