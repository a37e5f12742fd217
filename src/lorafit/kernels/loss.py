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
"""

from __future__ import annotations

import torch

from lorafit.kernels import matmul
from lorafit.options import RuntimeOptions


class LinearCrossEntropy(torch.autograd.Function):
    """``sum_i CE(softcap(h_i Wᵀ), y_i)`` over rows ``h`` (n × d) and targets ``y`` (n,), computed in chunks.
    ``options`` decides whether a frozen bf16 head is multiplied on an fp32 copy (:mod:`lorafit.options`)."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int, softcap: float | None, options: RuntimeOptions):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
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
            t = None
            if softcap:  # t = tanh(z / c) is kept for the derivative 1 − t²
                t = torch.tanh(z.div_(softcap), out=t_buf[:n])
                torch.mul(t, softcap, out=z)
            # Cross-entropy and its gradient softmax − onehot, in place in z: z − max, exp, sum, divide.
            zmax = z.amax(1, keepdim=True)
            target_logit = z.gather(1, yc[:, None])
            expz = z.sub_(zmax).exp_()
            sumexp = expz.sum(1, keepdim=True)
            total += (sumexp.log() + zmax - target_logit).sum()
            if not (need_h or need_w):
                continue
            grad = expz.div_(sumexp)
            grad[torch.arange(n, device=yc.device), yc] -= 1.0
            if softcap:
                grad.mul_(t.mul_(t).neg_().add_(1.0))
            if need_h and upcast:  # the fp32 softmax gradient is used as it is, not rounded first
                grad_h[start : start + n] = torch.mm(grad, weight)
            elif need_h:
                low = grad if low_buf is None else low_buf[:n].copy_(grad)
                torch.mm(low, weight, out=grad_h[start : start + n])
            if need_w:
                grad_w.addmm_(grad.t(), hc.float())
        del z_buf, low_buf, t_buf, weight
        ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
        ctx.has = (need_h, need_w)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        need_h, need_w = ctx.has
        gh = gw = None
        if need_h:
            gh = saved.pop(0)
            gh = gh * grad_out.to(gh.dtype)
        if need_w:
            gw = saved.pop(0) * grad_out
        return gh, gw, None, None, None, None
