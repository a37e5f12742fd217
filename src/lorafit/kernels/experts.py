"""Mixture-of-experts weights held in 4 or 8 bits (axolotl's ``quantize_moe_experts``).

transformers (v5) keeps a MoE layer's routed experts as 3-D parameters of one module (``gate_up_proj``: experts ×
out × in), not as ``nn.Linear`` layers, so the 4-/8-bit base of :func:`lorafit.models.quantize_base` does not reach
them, and in a MoE model they are most of the weights. Here each such tensor is stored as bitsandbytes' codes
(``quantize_4bit`` NF4/FP4, or LLM.int8's row-wise ``int8_vectorwise_quant``) and a parametrization
(``torch.nn.utils.parametrize``) dequantizes it whenever the module reads it, so the experts' own forward, written
by transformers for dense tensors, runs unchanged. The experts stay frozen.

The parametrization is lorafit's rather than bitsandbytes' ``Bnb4bitParametrization`` for two reasons: the
quantization state must follow the module when it moves to another device or dtype (lorafit quantizes on the host
and then moves the model), and the 8-bit form has no counterpart there.

Memory: within one forward of the experts module the dense tensor is dequantized once (``parametrize.cached``)
and dropped after it, except what autograd keeps for backward. Under gradient checkpointing that is one layer's
dense experts at a time; without it, :func:`recompute_in_backward` reruns the experts' forward in backward so
that only their inputs are kept, never the dense weights of every layer.
"""

from __future__ import annotations

import types

import torch
from torch.nn.utils import parametrize

from lorafit.errors import LorafitError


def expert_tensors(model) -> list[tuple[str, torch.nn.Module, str]]:
    """``(qualified name, module, parameter name)`` of each routed-experts tensor: a parameter of 3 or more
    dimensions held by a module whose path names experts (``mlp.experts``, ``block_sparse_moe.experts`` ...)."""
    found = []
    for mname, module in model.named_modules():
        if "expert" not in mname.rpartition(".")[2].lower():
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.ndim >= 3:
                found.append((f"{mname}.{pname}", module, pname))
    return found


class _Dequantize(torch.nn.Module):
    """Parametrization: codes (the stored parameter) -> the dense tensor, in the dtype it was quantized from.
    What dequantizing needs besides the codes (a subclass's ``_device`` / ``_move``) moves with the module
    (``_apply``) but keeps its dtype, since casting a model's weights must not round its quantization
    statistics."""

    def __init__(self, shape: torch.Size, dtype: torch.dtype):
        super().__init__()
        self.shape, self.dtype = shape, dtype

    def _apply(self, fn, recurse=True):
        probe = fn(torch.empty(0, dtype=self.dtype, device=self._device()))
        self._move(probe.device)
        if probe.dtype.is_floating_point:
            self.dtype = probe.dtype  # model.to(bfloat16): the experts dequantize to the model's new dtype
        return super()._apply(fn, recurse)


class Dequantize4bit(_Dequantize):
    def __init__(self, quant_state):
        super().__init__(quant_state.shape, quant_state.dtype)
        self.quant_state = quant_state

    def _device(self):
        return self.quant_state.absmax.device

    def _move(self, device):
        if device != self._device():
            self.quant_state.to(device)

    @torch.no_grad()
    def forward(self, codes):
        from lorafit.kernels.nf4 import bnb

        return bnb().functional.dequantize_4bit(codes, self.quant_state).to(self.dtype)


class Dequantize8bit(_Dequantize):
    def __init__(self, row_scales: torch.Tensor, shape: torch.Size, dtype: torch.dtype):
        super().__init__(shape, dtype)
        self.row_scales = row_scales

    def _device(self):
        return self.row_scales.device

    def _move(self, device):
        self.row_scales = self.row_scales.to(device)

    @torch.no_grad()
    def forward(self, codes):
        from lorafit.kernels.int8 import bnb

        dense = bnb().functional.int8_vectorwise_dequant(codes.reshape(-1, self.shape[-1]), self.row_scales)
        return dense.reshape(self.shape).to(self.dtype)


def _codes_4bit(weight: torch.Tensor, quant_type: str, double_quant: bool, blocksize: int):
    from lorafit.kernels.nf4 import bnb

    codes, state = bnb().functional.quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant,
                                                  quant_type=quant_type)
    return codes, Dequantize4bit(state)


def _codes_8bit(weight: torch.Tensor):
    """LLM.int8's row-wise codes of the fp16-rounded weight, each row of the last dimension one scale (what
    transformers' 8-bit loader stores for a linear layer's rows)."""
    from lorafit.kernels.int8 import bnb

    rows = weight.reshape(-1, weight.shape[-1]).to(torch.float16)
    codes, scales, _ = bnb().functional.int8_vectorwise_quant(rows)
    return codes.reshape(weight.shape), Dequantize8bit(scales, weight.shape, weight.dtype)


def quantize_experts(model, bits: int, quant_type: str = "nf4", double_quant: bool = True) -> int:
    """Store every routed-experts tensor of ``model`` (:func:`expert_tensors`) in ``bits`` (4: bitsandbytes'
    ``quantize_4bit`` with ``quant_type`` / ``double_quant``; 8: LLM.int8 rows), dequantized on read; returns how
    many. Sizes are checked before anything is replaced."""
    from lorafit.kernels import nf4

    tensors = expert_tensors(model)
    for name, module, pname in tensors:
        n = getattr(module, pname).numel()
        if bits == 4 and n % nf4.BLOCKSIZE:
            raise LorafitError(f"quantize_moe_experts: {name} ({n} elements) cannot be stored in 4 bits: its size "
                               f"is not a multiple of the block size {nf4.BLOCKSIZE}")
    for _, module, pname in tensors:
        weight = getattr(module, pname).detach()
        codes, dequant = (_codes_4bit(weight, quant_type, double_quant, nf4.BLOCKSIZE) if bits == 4
                          else _codes_8bit(weight))
        setattr(module, pname, torch.nn.Parameter(codes, requires_grad=False))
        parametrize.register_parametrization(module, pname, dequant, unsafe=True)
    for module in {id(m): m for _, m, _ in tensors}.values():
        read_once_per_forward(module)
    return len(tensors)


def read_once_per_forward(module) -> None:
    """Give ``module`` (an experts module whose tensors are parametrized: dequantized, or LoRA-adapted) the
    forward below, once."""
    if "lorafit_recompute" not in vars(module):
        module.lorafit_recompute = False
        module.forward = types.MethodType(_experts_forward, module)  # bound: a deep copy binds to its copy


def _experts_forward(self, *args, **kwargs):
    """The instance's forward: the class's, with each tensor dequantized once per call rather than once per
    read (transformers' experts read ``self.gate_up_proj`` once per routed expert); under
    :func:`recompute_in_backward`, checkpointed."""
    if self.lorafit_recompute and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(_read_once, self, *args, use_reentrant=False, **kwargs)
    return _read_once(self, *args, **kwargs)


def _read_once(module, *args, **kwargs):
    with parametrize.cached():  # a context: a checkpointed recompute that stops early leaves it too
        return type(module).forward(module, *args, **kwargs)


def recompute_in_backward(model) -> int:
    """Without gradient checkpointing, run each quantized-experts module under non-reentrant checkpointing:
    backward reruns its forward (dequantizing again) instead of keeping every layer's dense expert tensors,
    which autograd saves for ``dx``. Returns how many modules."""
    modules = [m for m in model.modules() if is_quantized_experts(m) and "lorafit_recompute" in vars(m)]
    for module in modules:
        module.lorafit_recompute = True
    return len(modules)


def is_quantized_experts(module) -> bool:
    """Whether ``module`` holds expert tensors stored by :func:`quantize_experts`."""
    return parametrize.is_parametrized(module) and any(
        isinstance(p, _Dequantize) for plist in module.parametrizations.values() for p in plist)


def dequantize_experts(model) -> int:
    """Put dense tensors back (dequantized, in their dtype) in place of the quantized experts: a merged model is
    written with the weights the adapter was trained against. Returns how many."""
    count = 0
    for module in list(model.modules()):
        if not is_quantized_experts(module):
            continue
        for pname in list(module.parametrizations.keys()):
            dense = getattr(module, pname).detach()  # a different dtype than the codes: set, not copied into
            parametrize.remove_parametrizations(module, pname, leave_parametrized=False)
            setattr(module, pname, torch.nn.Parameter(dense, requires_grad=False))
            count += 1
        vars(module).pop("forward", None)  # the class's forward again
        vars(module).pop("lorafit_recompute", None)
    return count


def expert_numels(model) -> dict[int, int]:
    """``id(codes) -> elements of the dense tensor`` for each quantized expert tensor (its codes pack several)."""
    return {id(plist.original): plist[0].shape.numel() for plist in _quantized_lists(model)}


def quantized_bytes(model) -> int:
    """Bytes the quantized expert tensors hold: codes plus their statistics."""
    from lorafit.kernels.nf4 import codes_bytes

    total = 0
    for plist in _quantized_lists(model):
        codes, dequant = plist.original, plist[0]
        total += (codes_bytes(codes, dequant.quant_state) if isinstance(dequant, Dequantize4bit)
                  else codes.numel() * codes.element_size() + dequant.row_scales.numel() * 4)
    return total


def _quantized_lists(model):
    """The parametrization lists that store a tensor as codes; a module's other tensors (merged dense, or a
    2-D parameter with only a LoRA update) are left out."""
    return [plist for m in model.modules() if is_quantized_experts(m) for plist in m.parametrizations.values()
            if isinstance(plist[0], _Dequantize)]
