"""Causal-LM loss without ever materialising the full (tokens × vocab) fp32 logits.

With a 49k–128k vocabulary the fp32 logits and their gradient are often the largest tensors of a LoRA step.
:class:`LinearCrossEntropy` takes the final hidden states of the *trained* positions only (prompt tokens
masked out of the loss need no logits at all), and walks over them in chunks: for each chunk it computes
the logits in fp32, the summed cross-entropy, and right away the gradient w.r.t. the hidden states
(``(softmax − onehot) · W``), which is all backward needs. Peak extra memory is one chunk of logits (one fp32
buffer, plus one in the compute dtype for the matmuls, reused by every chunk); the
head matmul runs twice per token (forward and grad), as in an unchunked loss, instead of three times as
with activation checkpointing of the head. (Which hidden states of which model go in is
:mod:`lorafit.train.loss`'s business.)

A LoRA head (``lm_head`` as a LoRA target) stays merge-free: the caller passes the frozen ``W`` plus the
low-rank input ``u = dropout(h) Aᵀ`` (n × r, small, made with autograd so A and the dropout get their gradients
there) and ``B`` (vocab × r); each chunk's logits are ``h Wᵀ + s · u Bᵀ``, and the chunk's softmax gradient
``g`` gives ``dh = g W``, ``du = s · g B`` and ``dB += s · gᵀ u`` right away. No (vocab × d) merged copy of the
head and no dense delta is ever formed, and the (n × vocab) logits stay chunked.
"""

from __future__ import annotations

import torch

from lorafit.kernels import matmul
from lorafit.options import RuntimeOptions


def softcap_(z: torch.Tensor, softcap: float | None, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """Gemma-2's logit soft-cap ``c · tanh(z / c)``, in place on fp32 logits ``z``; returns ``t = tanh(z / c)``
    (into ``out`` when given), which the gradient needs (``1 − t²``), or None without a cap."""
    if not softcap:
        return None
    t = torch.tanh(z.div_(softcap), out=out)
    torch.mul(t, softcap, out=z)
    return t


def cross_entropy_sum_(z: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of ``targets`` under fp32 logits ``z`` (n × vocab), and each row's ``Σ exp(z − max)``.
    ``z`` is overwritten with ``exp(z − max)`` (no second vocab-wide buffer): the softmax numerators, which the
    gradient ``softmax − onehot`` is made of in place."""
    zmax = z.amax(1, keepdim=True)
    target_logit = z.gather(1, targets[:, None])
    sumexp = z.sub_(zmax).exp_().sum(1, keepdim=True)
    return (sumexp.log() + zmax - target_logit).sum(), sumexp


class LinearCrossEntropy(torch.autograd.Function):
    """``sum_i CE(softcap(h_i Wᵀ + s · u_i Bᵀ), y_i)`` over rows ``h`` (n × d) and targets ``y`` (n,), computed in
    chunks; the LoRA term is there when ``lora_u`` (n × r) and ``lora_b`` (vocab × r) are given.
    ``options`` decides whether a frozen bf16 head is multiplied on an fp32 copy (:mod:`lorafit.options`)."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int, softcap: float | None, options: RuntimeOptions,
                lora_u=None, lora_b=None, scaling: float = 0.0):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        lora = lora_u is not None
        need_u = lora and ctx.needs_input_grad[6]
        need_b = lora and ctx.needs_input_grad[7]
        if lora:
            u32, b32 = lora_u.float(), lora_b.float()
        grad_u = torch.empty(lora_u.shape, dtype=torch.float32, device=h.device) if need_u else None
        grad_b = torch.zeros(lora_b.shape, dtype=torch.float32, device=h.device) if need_b else None
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        # A frozen bf16 head on a CPU whose bf16 GEMMs are slow: one fp32 copy of it for all chunks.
        upcast = not need_w and matmul.upcasts_head(options, weight.dtype, weight.device, h.shape[0], weight.numel())
        if upcast:
            weight = weight.float()
        # One set of chunk buffers, reused: a fresh 32 MiB tensor per chunk and per op costs more in page faults
        # (CPU) and allocator traffic than the arithmetic done in it.
        rows, vocab = min(chunk, h.shape[0]), weight.shape[0]
        z_buf = torch.empty(rows, vocab, dtype=torch.float32, device=h.device)
        low_buf = torch.empty(rows, vocab, dtype=weight.dtype, device=h.device) if weight.dtype != torch.float32 else None
        t_buf = torch.empty_like(z_buf) if softcap else None
        for start in range(0, h.shape[0], chunk):
            hc, yc = h[start : start + chunk], targets[start : start + chunk]
            if upcast:
                hc = hc.float()
            n = hc.shape[0]
            z = z_buf[:n]
            if low_buf is None:
                torch.mm(hc, weight.t(), out=z)
            else:
                z.copy_(torch.mm(hc, weight.t(), out=low_buf[:n]))
            if lora:
                z.addmm_(u32[start : start + n], b32.t(), alpha=scaling)
            t = softcap_(z, softcap, t_buf[:n] if softcap else None)
            # Cross-entropy and its gradient softmax − onehot, in place in z: z − max, exp, sum, divide.
            ce, sumexp = cross_entropy_sum_(z, yc)
            total += ce
            if not (need_h or need_w or need_u or need_b):
                continue
            grad = z.div_(sumexp)
            grad[torch.arange(n, device=yc.device), yc] -= 1.0
            if softcap:
                grad.mul_(t.mul_(t).neg_().add_(1.0))
            if need_u:
                torch.mm(grad, b32, out=grad_u[start : start + n]).mul_(scaling)
            if need_b:
                grad_b.addmm_(grad.t(), u32[start : start + n], alpha=scaling)
            if need_h and upcast:  # the fp32 softmax gradient is used as it is, not rounded first
                grad_h[start : start + n] = torch.mm(grad, weight)
            elif need_h:
                low = grad if low_buf is None else low_buf[:n].copy_(grad)
                torch.mm(low, weight, out=grad_h[start : start + n])
            if need_w:
                grad_w.addmm_(grad.t(), hc.float())
        del z_buf, low_buf, t_buf, weight
        ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_u, grad_b) if t is not None))
        ctx.has = (need_h, need_w, need_u, need_b)
        ctx.dtypes = (lora_u.dtype, lora_b.dtype) if lora else None
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        need_h, need_w, need_u, need_b = ctx.has
        gh = gw = gu = gb = None
        if need_h:
            gh = saved.pop(0)
            gh = gh * grad_out.to(gh.dtype)
        if need_w:
            gw = saved.pop(0) * grad_out
        if need_u:
            gu = (saved.pop(0) * grad_out).to(ctx.dtypes[0])
        if need_b:
            gb = (saved.pop(0) * grad_out).to(ctx.dtypes[1])
        return gh, gw, None, None, None, None, gu, gb, None
