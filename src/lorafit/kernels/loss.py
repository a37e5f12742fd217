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


def cross_entropy_(z: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's cross-entropy of ``targets`` under fp32 logits ``z`` (n × vocab), and each row's
    ``Σ exp(z − max)``. ``z`` is overwritten with ``exp(z − max)`` (no second vocab-wide buffer): the softmax
    numerators, which the gradient ``softmax − onehot`` is made of in place."""
    zmax = z.amax(1, keepdim=True)
    target_logit = z.gather(1, targets[:, None])
    sumexp = z.sub_(zmax).exp_().sum(1, keepdim=True)
    return (sumexp.log() + zmax - target_logit).squeeze(1), sumexp


def cross_entropy_sum_(z: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cross_entropy_` summed over the rows."""
    ce, sumexp = cross_entropy_(z, targets)
    return ce.sum(), sumexp


class _Chunks:
    """The chunk loop's shared state: the head (an fp32 copy of a frozen bf16 one where the options say so), the
    LoRA factors in fp32, and one set of chunk buffers reused by every chunk (a fresh 32 MiB tensor per chunk and
    per op costs more in page faults (CPU) and allocator traffic than the arithmetic done in it)."""

    def __init__(self, h, weight, chunk: int, softcap, options, lora_u, lora_b, scaling: float, frozen: bool):
        self.upcast = frozen and matmul.upcasts_head(options, weight.dtype, weight.device, h.shape[0], weight.numel())
        self.weight = weight.float() if self.upcast else weight
        self.lora = lora_u is not None
        self.u32, self.b32 = (lora_u.float(), lora_b.float()) if self.lora else (None, None)
        self.h, self.chunk, self.softcap, self.scaling = h, chunk, softcap, scaling
        rows, vocab = min(chunk, h.shape[0]), weight.shape[0]
        self.z_buf = torch.empty(rows, vocab, dtype=torch.float32, device=h.device)
        w_dtype = self.weight.dtype
        self.low_buf = torch.empty(rows, vocab, dtype=w_dtype, device=h.device) if w_dtype != torch.float32 else None
        self.t_buf = torch.empty_like(self.z_buf) if softcap else None

    def __iter__(self):
        """Per chunk: ``(start, hc, z, t)``, ``z`` the fp32 logits (soft-capped), ``t`` the cap's tanh (or None)."""
        for start in range(0, self.h.shape[0], self.chunk):
            hc = self.h[start : start + self.chunk]
            if self.upcast:
                hc = hc.float()
            n = hc.shape[0]
            z = self.z_buf[:n]
            if self.low_buf is None:
                torch.mm(hc, self.weight.t(), out=z)
            else:
                z.copy_(torch.mm(hc, self.weight.t(), out=self.low_buf[:n]))
            if self.lora:
                z.addmm_(self.u32[start : start + n], self.b32.t(), alpha=self.scaling)
            t = softcap_(z, self.softcap, self.t_buf[:n] if self.softcap else None)
            yield start, hc, z, t

    def softmax_grad_(self, z, sumexp, yc, t) -> torch.Tensor:
        """``z`` (holding ``exp(z − max)``) made the logits' gradient ``softmax − onehot`` in place (soft-capped)."""
        grad = z.div_(sumexp)
        grad[torch.arange(z.shape[0], device=yc.device), yc] -= 1.0
        if self.softcap:
            grad.mul_(t.mul_(t).neg_().add_(1.0))
        return grad

    def free(self) -> None:
        del self.z_buf, self.low_buf, self.t_buf, self.weight, self.h


class LinearCrossEntropy(torch.autograd.Function):
    """``sum_i CE(softcap(h_i Wᵀ + s · u_i Bᵀ), y_i)`` over rows ``h`` (n × d) and targets ``y`` (n,), computed in
    chunks; the LoRA term is there when ``lora_u`` (n × r) and ``lora_b`` (vocab × r) are given.
    ``options`` decides whether a frozen bf16 head is multiplied on an fp32 copy (:mod:`lorafit.options`).

    ``segments`` (n,) and ``n_segments``: sums per segment instead (a vector, e.g. each sequence's answer
    log-probability for a preference loss), all sequences in one call. The gradients that sum over tokens (the
    head's, a LoRA head's B) then depend on each segment's upstream gradient, known only in backward: they are
    made there, recomputing the logits (a third head matmul), instead of one (vocab × d) buffer per segment."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int, softcap: float | None, options: RuntimeOptions,
                lora_u=None, lora_b=None, scaling: float = 0.0, segments=None, n_segments: int = 0):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        lora = lora_u is not None
        need_u = lora and ctx.needs_input_grad[6]
        need_b = lora and ctx.needs_input_grad[7]
        late = segments is not None and (need_w or need_b)  # the summed gradients are made in backward
        now_w, now_b = need_w and not late, need_b and not late
        grad_u = torch.empty(lora_u.shape, dtype=torch.float32, device=h.device) if need_u else None
        grad_b = torch.zeros(lora_b.shape, dtype=torch.float32, device=h.device) if now_b else None
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if now_w else None
        total = torch.zeros(n_segments if segments is not None else (), dtype=torch.float32, device=h.device)
        chunks = _Chunks(h, weight, chunk, softcap, options, lora_u, lora_b, scaling, frozen=not need_w)
        for start, hc, z, t in chunks:
            n, yc = hc.shape[0], targets[start : start + chunk]
            if segments is None:
                ce, sumexp = cross_entropy_sum_(z, yc)
                total += ce
            else:
                ce, sumexp = cross_entropy_(z, yc)
                total.index_add_(0, segments[start : start + n], ce)
            if not (need_h or now_w or need_u or now_b):
                continue
            grad = chunks.softmax_grad_(z, sumexp, yc, t)
            if need_u:
                torch.mm(grad, chunks.b32, out=grad_u[start : start + n]).mul_(scaling)
            if now_b:
                grad_b.addmm_(grad.t(), chunks.u32[start : start + n], alpha=scaling)
            if need_h and chunks.upcast:  # the fp32 softmax gradient is used as it is, not rounded first
                grad_h[start : start + n] = torch.mm(grad, chunks.weight)
            elif need_h:
                low = grad if chunks.low_buf is None else chunks.low_buf[:n].copy_(grad)
                torch.mm(low, chunks.weight, out=grad_h[start : start + n])
            if now_w:
                grad_w.addmm_(grad.t(), hc.float())
        chunks.free()
        ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_u, grad_b) if t is not None),
                              *((h, weight, targets, lora_u, lora_b) if late else ()),
                              *((segments,) if segments is not None else ()))
        ctx.has = (need_h, need_w, need_u, need_b, late, segments is not None)
        ctx.late_args = (chunk, softcap, options, scaling) if late else None
        ctx.dtypes = (lora_u.dtype, lora_b.dtype) if lora else None
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        need_h, need_w, need_u, need_b, late, segmented = ctx.has
        gh = gw = gu = gb = None
        grad_h = saved.pop(0) if need_h else None
        grad_w = saved.pop(0) if need_w and not late else None
        grad_u = saved.pop(0) if need_u else None
        grad_b = saved.pop(0) if need_b and not late else None
        if late:  # (lora_u and lora_b are None without a LoRA head: saved as None)
            h, weight, targets, lora_u, lora_b = saved[:5]
        segments = saved[-1] if segmented else None
        # each token's upstream gradient: its segment's, or the one of the sum
        weights = grad_out.index_select(0, segments)[:, None] if segmented else grad_out
        if need_h:
            gh = grad_h * weights.to(grad_h.dtype)
        if need_u:
            gu = (grad_u * weights).to(ctx.dtypes[0])
        if late:
            gw, gb = _summed_grads(h, weight, targets, lora_u, lora_b, weights.squeeze(1), need_w, need_b,
                                   *ctx.late_args)
            gb = gb.to(ctx.dtypes[1]) if gb is not None else None
        else:
            gw = grad_w * grad_out if need_w else None
            gb = (grad_b * grad_out).to(ctx.dtypes[1]) if need_b else None
        return gh, gw, None, None, None, None, gu, gb, None, None, None


def _summed_grads(h, weight, targets, lora_u, lora_b, token_weights, need_w: bool, need_b: bool, chunk: int,
                  softcap, options, scaling: float):
    """The head's and a LoRA head's B gradient of a segmented sum: the logits again, chunk by chunk, each token's
    ``softmax − onehot`` scaled by its segment's upstream gradient."""
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    grad_b = torch.zeros(lora_b.shape, dtype=torch.float32, device=h.device) if need_b else None
    chunks = _Chunks(h, weight, chunk, softcap, options, lora_u, lora_b, scaling, frozen=not need_w)
    for start, hc, z, t in chunks:
        n, yc = hc.shape[0], targets[start : start + chunk]
        _, sumexp = cross_entropy_(z, yc)
        grad = chunks.softmax_grad_(z, sumexp, yc, t).mul_(token_weights[start : start + n, None].float())
        if need_b:
            grad_b.addmm_(grad.t(), chunks.u32[start : start + n], alpha=scaling)
        if need_w:
            grad_w.addmm_(grad.t(), hc.float())
    chunks.free()
    return grad_w, grad_b
