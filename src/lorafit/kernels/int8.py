"""An 8-bit frozen base (LLM.int8, Dettmers et al. 2022) as tensor math: bitsandbytes quantizes and multiplies.

The base weight is stored the way transformers' ``BitsAndBytesConfig(load_in_8bit=True)`` stores it
(``bitsandbytes.nn.Int8Params``: int8 codes ``CB``, one row per output, and the fp32 row scales ``SCB``, the
row's absmax of the fp16 weight), so a lorafit 8-bit model and a transformers one hold the same bytes. Nothing here
writes int8 quantization: :func:`quantize` and :func:`dequantize` are bitsandbytes' own.

The base output is the bitsandbytes ``Linear8bitLt``'s own forward (its LLM.int8 matmul on CUDA; on the CPU, in
training, the dequantize-and-multiply it runs there), so lorafit computes what PEFT computes over the same layer.
:class:`LoraDeltaFunction` adds lorafit's LoRA branch to that output.
"""

from __future__ import annotations

import torch

from lorafit.errors import LorafitError
from lorafit.kernels import dropout
from lorafit.kernels.lora_branch import branch_grads
from lorafit.kernels.nf4 import bnb, swap_modules
from lorafit.options import RuntimeOptions

# transformers' BitsAndBytesConfig default: input columns with an entry above it go through the fp16 matmul
THRESHOLD = 6.0


def is_int8(weight) -> bool:
    """Whether ``weight`` is a bitsandbytes ``Int8Params`` holding int8 codes (a frozen 8-bit weight)."""
    return type(weight).__name__ == "Int8Params" and weight.dtype == torch.int8


def quantize(weight: torch.Tensor) -> torch.nn.Parameter:
    """``weight`` (out × in) as a frozen ``Int8Params`` on its device: bitsandbytes' ``int8_vectorwise_quant`` of
    the fp16 weight, as transformers' loader calls it (through ``Int8Params``, which quantizes when moved)."""
    param = bnb().nn.Int8Params(weight.detach().cpu(), requires_grad=False, has_fp16_weights=False)
    return param.to(weight.device)


def scales(layer) -> torch.Tensor:
    """A ``Linear8bitLt``'s fp32 row scales: on its weight until its first forward, which moves them (and the
    codes) into ``layer.state``, as bitsandbytes does."""
    return layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB


def dequantize(layer) -> torch.Tensor:
    """The dense (out × in) fp32 weight of a ``Linear8bitLt``: ``CB · SCB / 127``, bitsandbytes'
    ``int8_vectorwise_dequant`` (what PEFT merges into)."""
    return bnb().functional.int8_vectorwise_dequant(layer.weight.data, scales(layer))


def int8_bytes(layer) -> int:
    """Bytes a ``Linear8bitLt``'s weight holds: the int8 codes and the fp32 row scales."""
    w, s = layer.weight.data, scales(layer)
    return w.numel() * w.element_size() + s.numel() * s.element_size()


class LoraDeltaFunction(torch.autograd.Function):
    """``y = base + s · (drop(x) Aᵀ) Bᵀ``: the LoRA branch added to a base output computed outside (the int8
    layer's own forward, with its own autograd for x's gradient). Keeps x by reference, ``x·Aᵀ`` and a seed."""

    @staticmethod
    def forward(ctx, base, x, lora_a, lora_b, scaling: float, dropout_p: float, options: RuntimeOptions):
        x2 = x.reshape(-1, x.shape[-1])
        a, b = lora_a.to(x2.dtype), lora_b.to(x2.dtype)
        seed = None
        if dropout_p > 0:
            seed = dropout.new_seed(x2.device, options.compile)
            xa = (dropout.dropped(x2, seed=seed, p=dropout_p) @ a.t()).mul_(1.0 / (1.0 - dropout_p))
        else:
            xa = x2 @ a.t()
        y = torch.addmm(base.reshape(-1, base.shape[-1]).to(x2.dtype), xa, b.t(), alpha=scaling)
        ctx.save_for_backward(x, lora_a, lora_b, xa, seed)
        ctx.scaling, ctx.dropout_p, ctx.base_dtype = scaling, dropout_p, base.dtype
        return y.view(*base.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, lora_a, lora_b, xa, seed = ctx.saved_tensors
        n = ctx.needs_input_grad
        g = grad_out.reshape(-1, grad_out.shape[-1])
        g_xa, grad_b = branch_grads(g, lora_b, xa, ctx.scaling, ctx.dropout_p, seed is not None, n[3])
        grad_x = grad_a = None
        x2 = x.reshape(-1, x.shape[-1])
        a = lora_a.to(g.dtype)
        if n[1]:
            low = g_xa @ a
            grad_x = (dropout.dropped(low, seed=seed, p=ctx.dropout_p) if seed is not None else low).view(x.shape)
        if n[2]:
            xd = dropout.dropped(x2, seed=seed, p=ctx.dropout_p) if seed is not None else x2
            grad_a = (g_xa.t() @ xd.to(g.dtype)).to(lora_a.dtype)
        grad_base = grad_out.to(ctx.base_dtype) if n[0] else None
        return grad_base, grad_x, grad_a, grad_b, None, None, None


class ShardableLinear8bit(torch.nn.Module):
    """bitsandbytes' ``Linear8bitLt`` (frozen int8 weights) with its codes and row scales as plain frozen
    parameters, so FSDP2 shards them (``lorafit.kernels.nf4.ShardableLinear4bit`` is the 4-bit counterpart).

    ``Linear8bitLt`` moves its codes into a ``MatmulLtState`` on the module at its first forward, where FSDP2
    would neither shard nor gather them; here a fresh state is made on every forward around the codes and scales
    in hand (the all-gathered ones inside forward), and bitsandbytes' own ``matmul`` runs with it, as the layer
    does. Its backward reads the state's codes again, whose storage FSDP2 gathers back before backward."""

    def __init__(self, layer):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.compute_dtype = getattr(layer, "compute_dtype", None)
        self.threshold = layer.state.threshold
        self.codes = torch.nn.Parameter(layer.weight.data, requires_grad=False)
        self.scales = torch.nn.Parameter(scales(layer), requires_grad=False)
        self.register_parameter("bias", layer.bias)

    @property
    def weight(self):
        """The codes in hand as bitsandbytes' ``Int8Params`` (an alias of their storage, scales attached)."""
        if hasattr(self.codes, "to_local"):
            raise LorafitError("an 8-bit layer sharded by FSDP2 holds only its shard of the codes outside forward; "
                               "read its weight inside the model's forward")
        return bnb().nn.Int8Params(self.codes, requires_grad=False, has_fp16_weights=False, CB=self.codes,
                                   SCB=self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``Linear8bitLt.forward`` with a state made from the codes and scales in hand."""
        b = bnb()
        state = b.MatmulLtState()
        state.threshold, state.has_fp16_weights, state.is_training = self.threshold, False, self.training
        state.CB, state.SCB = self.codes, self.scales
        bias = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        return b.matmul(x, self.weight, bias=bias, state=state)


def make_shardable(model: torch.nn.Module) -> int:
    """Replace every bitsandbytes ``Linear8bitLt`` of ``model`` in place by a :class:`ShardableLinear8bit` holding
    the same tensors; returns how many (FSDP2 only: one process and DDP keep bitsandbytes' layers)."""
    return swap_modules(model, bnb().nn.Linear8bitLt, ShardableLinear8bit)
