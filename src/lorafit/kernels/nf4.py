"""A 4-bit frozen base (QLoRA, Dettmers et al. 2023) as tensor math: bitsandbytes quantizes and dequantizes.

The base weight is stored the way transformers + bitsandbytes store it (``bitsandbytes.nn.Params4bit``: packed
4-bit codes plus a ``QuantState`` with the per-block absmax, itself 8-bit quantized under double quantization), so
a lorafit 4-bit model and a transformers ``BitsAndBytesConfig(load_in_4bit=True)`` model hold the same bytes.
Nothing here writes NF4: :func:`quantize` and :func:`dequantize` are bitsandbytes' own.

:class:`QLoraLinearFunction` is :class:`~lorafit.kernels.lora_branch.LoraLinearFunction` over such a weight:
the dense weight is dequantized in forward, used, dropped, and dequantized again in backward for ``dx = g W``.
Forward keeps only what the plain LoRA function keeps (x by reference, ``x·Aᵀ``, a dropout seed) and a reference
to the packed weight, so the transient is one layer's dense weight at a time, never the model's.
"""

from __future__ import annotations

import torch

from lorafit.errors import LorafitError
from lorafit.kernels.lora_branch import (
    Branch,
    Needs,
    Saved,
    branch_backward,
    branch_forward,
    compute_dtype_for,
)
from lorafit.options import RuntimeOptions

# bitsandbytes' block size for 4-bit weights (transformers' BitsAndBytesConfig uses its default, 64)
BLOCKSIZE = 64
QUANT_TYPES = ("nf4", "fp4")


def bnb():
    """The ``bitsandbytes`` module, or one line saying how to get it."""
    try:
        import bitsandbytes
    except ImportError as e:  # a broken build raises other errors on import; they say what is wrong themselves
        raise LorafitError(f"a 4-bit base (load_in_4bit) and 8-bit optimizers need bitsandbytes, which did not "
                           f"import ({e}); run: pip install 'bitsandbytes>=0.50'") from None
    return bitsandbytes


def is_4bit(weight) -> bool:
    """Whether ``weight`` is a bitsandbytes 4-bit parameter that has been quantized."""
    return getattr(weight, "quant_state", None) is not None and getattr(weight, "bnb_quantized", False)


def quantize(weight: torch.Tensor, quant_type: str = "nf4", double_quant: bool = True,
             blocksize: int = BLOCKSIZE) -> torch.nn.Parameter:
    """``weight`` (out × in) as a frozen ``Params4bit`` on its device: bitsandbytes' ``quantize_4bit``, as
    transformers' loader calls it (through ``Params4bit``); the codes keep the weight's dtype for dequantizing."""
    if weight.numel() % blocksize:
        raise LorafitError(f"a weight of shape {tuple(weight.shape)} cannot be quantized to 4 bits: its "
                           f"{weight.numel()} elements are not a multiple of the block size {blocksize}")
    param = bnb().nn.Params4bit(weight.detach(), requires_grad=False, blocksize=blocksize,
                                compress_statistics=double_quant, quant_type=quant_type)
    return param.to(weight.device)  # Params4bit quantizes when it is moved to a device


def dequantize(weight) -> torch.Tensor:
    """The dense (out × in) weight a ``Params4bit`` stands for, in the dtype it was quantized from."""
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):  # bitsandbytes' CPU inference packing: undo first
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        state = weight.quant_state
    return bnb().functional.dequantize_4bit(weight.data, state)


def dense(weight, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` as a dense matrix in ``dtype``: dequantized if it is 4-bit, else itself (a kernel shared by
    plain and 4-bit layers calls this where it uses the weight, and keeps only the packed one)."""
    return dequantize(weight).to(dtype) if is_4bit(weight) else weight


def packed_bytes(weight) -> int:
    """Bytes a ``Params4bit`` holds: codes, absmax and (double quantization) the absmax's own statistics."""
    return codes_bytes(weight.data, weight.quant_state)


def codes_bytes(codes: torch.Tensor, state) -> int:
    """Bytes of 4-bit ``codes`` with their ``QuantState``."""
    n = codes.numel() * codes.element_size() + state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        n += state.state2.absmax.numel() * state.state2.absmax.element_size() + state.offset.numel() * 4
        n += state.state2.code.numel() * 4
    return n + state.code.numel() * 4


class QLoraLinearFunction(torch.autograd.Function):
    """``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ`` with ``W = dequantize(packed)``, dequantized in forward and again
    in backward (the module docstring). ``packed`` is the frozen ``Params4bit``: no gradient reaches it."""

    @staticmethod
    def forward(ctx, x, packed, bias, lora_a, lora_b, scaling: float, dropout_p: float, options: RuntimeOptions):
        weight = dequantize(packed).to(x.dtype)
        br = Branch(weight, bias, lora_a, lora_b, scaling, dropout_p)
        ctx.compute_dtype = compute_dtype_for(options, x, weight)
        y, saved = branch_forward(x.reshape(-1, x.shape[-1]), br, ctx.compute_dtype, hashed=options.compile)
        del weight, br
        ctx.save_for_backward(x, lora_a, lora_b, saved.xa, saved.seed)
        ctx.packed = packed  # the frozen packed weight, by reference
        ctx.scaling, ctx.dropout_p, ctx.has_bias = scaling, dropout_p, bias is not None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, lora_a, lora_b, xa, seed = ctx.saved_tensors
        n = ctx.needs_input_grad
        needs = Needs(x=n[0], weight=False, bias=n[2] and ctx.has_bias, lora_a=n[3], lora_b=n[4])
        weight = dequantize(ctx.packed).to(x.dtype) if needs.x else None
        br = Branch(weight, None, lora_a, lora_b, ctx.scaling, ctx.dropout_p)
        grads = branch_backward(grad_out.reshape(-1, grad_out.shape[-1]), br, Saved(xa, seed), needs,
                                ctx.compute_dtype, x2=x.reshape(-1, x.shape[-1]))
        grad_x = grads.x.view(x.shape) if grads.x is not None else None
        return grad_x, None, grads.bias, grads.lora_a, grads.lora_b, None, None, None


class ShardableLinear4bit(torch.nn.Module):
    """bitsandbytes' ``Linear4bit`` with what FSDP2 must shard as plain frozen parameters: the packed codes and
    the per-block absmax. FSDP2 turns parameters into DTensors, which would drop a ``Params4bit``'s
    ``quant_state``; here the state is rebuilt around the tensors in hand on every read of :attr:`weight`. The
    rest of the state (shape, code book, double quantization's own absmax and offset: about a kilobyte a layer) is
    kept beside them as buffers, on every rank.

    Inside a sharded block's forward FSDP2 has swapped in the all-gathered (unsharded) codes and absmax, so
    ``weight`` is the whole ``Params4bit``; a kernel keeping it for backward keeps that view, whose storage FSDP2
    frees after forward and all-gathers again before backward (torch all-gathers a group of mixed dtypes as bytes).
    Outside forward the parameters are this rank's shards and ``weight`` refuses."""

    def __init__(self, layer):
        super().__init__()
        packed = layer.weight
        if getattr(packed.quant_state, "packing_format_for_cpu", False):
            dequantize(packed)  # undoes bitsandbytes' CPU inference packing in place: store the canonical codes
        state = packed.quant_state
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.compute_dtype = getattr(layer, "compute_dtype", None)
        self.blocksize, self.quant_type, self.quant_dtype = state.blocksize, state.quant_type, state.dtype
        self.shape = state.shape
        frozen = dict(requires_grad=False)
        self.codes = torch.nn.Parameter(packed.data, **frozen)
        self.absmax = torch.nn.Parameter(state.absmax, **frozen)
        self.register_parameter("bias", layer.bias)
        self.register_buffer("code", state.code)
        self.nested_blocksize = state.state2.blocksize if state.nested else None
        for name, t in (("offset", state.offset), ("nested_absmax", state.state2.absmax if state.nested else None),
                        ("nested_code", state.state2.code if state.nested else None)):
            self.register_buffer(name, None if t is None else torch.as_tensor(t))

    @property
    def weight(self):
        """The codes in hand as bitsandbytes' ``Params4bit`` (an alias of their storage, not a copy)."""
        if hasattr(self.codes, "to_local"):
            raise LorafitError("a 4-bit layer sharded by FSDP2 holds only its shard of the codes outside forward; "
                               "read its weight inside the model's forward")
        functional = bnb().functional
        state2 = None if self.nested_blocksize is None else functional.QuantState(
            absmax=self.nested_absmax, code=self.nested_code, blocksize=self.nested_blocksize, dtype=torch.float32)
        state = functional.QuantState(absmax=self.absmax, shape=self.shape, code=self.code, blocksize=self.blocksize,
                                      quant_type=self.quant_type, dtype=self.quant_dtype, offset=self.offset,
                                      state2=state2)
        return bnb().nn.Params4bit(self.codes, requires_grad=False, quant_state=state, blocksize=self.blocksize,
                                   compress_statistics=state2 is not None, quant_type=self.quant_type,
                                   quant_storage=self.codes.dtype, bnb_quantized=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``Linear4bit.forward`` (training path): bitsandbytes' ``matmul_4bit`` in the compute dtype."""
        weight, dtype = self.weight, self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return bnb().matmul_4bit(x.to(dtype), weight, bias=bias, quant_state=weight.quant_state).to(x.dtype)


def swap_modules(model: torch.nn.Module, kind: type, make) -> int:
    """Replace every ``kind`` module of ``model`` in place by ``make(module)`` (in the same train/eval mode);
    returns how many."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, kind)]
    for name, m in found:
        model.set_submodule(name, make(m).train(m.training))
    return len(found)


def make_shardable(model: torch.nn.Module) -> int:
    """Replace every bitsandbytes ``Linear4bit`` of ``model`` (a LoRA layer's base or a bare one) in place by a
    :class:`ShardableLinear4bit` holding the same tensors; returns how many. Only FSDP2 needs this: a single
    process and DDP keep bitsandbytes' own layers."""
    return swap_modules(model, bnb().nn.Linear4bit, ShardableLinear4bit)
