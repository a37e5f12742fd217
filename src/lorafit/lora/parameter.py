"""LoRA on a parameter rather than a layer: PEFT's ``target_parameters`` (axolotl's ``lora_target_parameters``).

A mixture-of-experts layer keeps its routed experts as one 3-D tensor per projection (experts × out × in), read
by transformers' own experts code, so there is no ``nn.Linear`` to wrap. As in PEFT's ``ParamWrapper``, the
tensor is adapted where it is read: a parametrization makes it ``W + s · B_e A_e`` for each expert ``e``, with
per-expert factors stacked in two linear layers::

    A: (r·E × in), rows e·r … e·r+r-1 are A_e          B: (out × r·E), column j·E + e is column j of B_e

(PEFT's layout, so files load both ways). The update is added with one ``baddbmm`` in the tensor's dtype, as PEFT
does (a 2-D tensor: ``B @ A · s`` in the factors' dtype, cast and added, as PEFT does for it). Several
parameters of one module nest as in PEFT: the module's first parameter (in definition order) is wrapped first,
so its factors are saved under ``<module>.base_layer.lora_A.weight`` and the last one's under
``<module>.lora_A.weight``. PEFT's rules hold too: no dropout (it cannot act on a weight update) and no DoRA.

The parametrization stays registered while the adapter is attached; ``disabled`` and ``merged`` make it return
the tensor unchanged. The experts module reads each tensor once per forward
(:func:`lorafit.kernels.experts.read_once_per_forward`), so the update is computed once per layer and step.
A tensor stored quantized (``quantize_moe_experts``) is dequantized first, then adapted; merging writes it dense.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from lorafit.kernels.experts import read_once_per_forward


class LoraParameter(nn.Module):
    """A trainable low-rank update of ``base_layer``'s parameter ``parameter_name`` (2-D, or 3-D experts)."""

    fan_in_fan_out = False

    def __init__(self, base_layer: nn.Module, parameter_name: str, r: int, alpha: float,
                 use_rslora: bool = False, adapter_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.base_layer, self.parameter_name = base_layer, parameter_name
        target = self.target_module()
        current = getattr(target, parameter_name)  # read once: a stored-quantized tensor is dequantized to read it
        shape = current.shape
        # transformers' experts are (experts, out, in); a module may say it stores (experts, in, out)
        self.stacked = len(shape) == 3  # experts; else a 2-D tensor (stored codes may have another shape)
        self.transposed = self.stacked and bool(getattr(target, "is_transposed", False))
        experts, d1, d2 = shape if len(shape) == 3 else (1, *shape)
        self.num_experts = experts
        self.out_features, self.in_features = (d2, d1) if self.transposed else (d1, d2)
        self.r, self.scaling = r, alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_A = nn.Linear(self.in_features, r * experts, bias=False, dtype=adapter_dtype)
        self.lora_B = nn.Linear(r * experts, self.out_features, bias=False, dtype=adapter_dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.merged = self.disabled = False
        requires_grad = current.requires_grad and not parametrize.is_parametrized(target, parameter_name)
        parametrize.register_parametrization(target, parameter_name, _Update(self), unsafe=True)
        target.parametrizations[parameter_name].original.requires_grad_(requires_grad)
        read_once_per_forward(target)

    def target_module(self) -> nn.Module:
        """The module that holds the parameter (under any LoraParameter of the same module's other tensors)."""
        module = self.base_layer
        while isinstance(module, LoraParameter):
            module = module.base_layer
        return module

    def forward(self, *args, **kwargs):
        return self.base_layer(*args, **kwargs)

    def factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lhs, rhs)`` with the update ``s · lhs @ rhs`` (batched over experts), in ``dtype``."""
        a = self.lora_A.weight.reshape(self.num_experts, -1, self.in_features)  # (E, r, in)
        b = self.lora_B.weight.reshape(self.out_features, -1, self.num_experts).permute(2, 0, 1)  # (E, out, r)
        lhs, rhs = (a.transpose(1, 2), b.transpose(1, 2)) if self.transposed else (b, a)
        return lhs.to(dtype), rhs.to(dtype)

    def updated(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight + s · update`` in ``weight``'s dtype: experts in one ``baddbmm``, autocast off, as PEFT folds
        them; a 2-D tensor as PEFT adapts it (``num_experts == 1``): ``B @ A · s`` in the factors' dtype, cast to
        the weight's, then added."""
        if weight.dim() == 2:
            return weight + ((self.lora_B.weight @ self.lora_A.weight) * self.scaling).to(weight.dtype)
        lhs, rhs = self.factors(weight.dtype)
        with torch.autocast(device_type=weight.device.type, enabled=False):
            return torch.baddbmm(weight, lhs, rhs, alpha=self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """``s · update``, in fp32, shaped like the parameter: PEFT's ``get_delta_weight``, so a merge adds what
        PEFT's adds."""
        a, b = self.lora_A.weight.float(), self.lora_B.weight.float()
        if not self.stacked:
            return (b @ a) * self.scaling
        a = a.reshape(self.num_experts, -1, self.in_features)  # (E, r, in)
        b = b.reshape(self.out_features, -1, self.num_experts)  # (out, r, E)
        layout = "o r e, e r i -> e i o" if self.transposed else "o r e, e r i -> e o i"
        return torch.einsum(layout, b, a) * self.scaling

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}

    def _plist(self):
        return self.target_module().parametrizations[self.parameter_name]

    def dense_weight(self) -> torch.Tensor:
        """The parameter before this update (dequantized first when it is stored quantized)."""
        plist, update = self._plist(), self._update()
        value = plist.original
        for p in plist:
            if p is update:
                return value
            value = p(value)
        return value

    def _update(self):
        return next(p for p in self._plist() if isinstance(p, _Update) and p.owner is self)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update to the stored tensor. A tensor stored quantized is written dense: dequantized + update
        (the weights the update was trained against)."""
        if self.merged:
            return
        plist = self._plist()
        if len(plist) == 1:  # a dense tensor: updated in place, as PEFT merges
            plist.original.add_(self.delta_weight().to(plist.original.dtype))
        else:
            base = self.dense_weight()
            self._set_dense((base.float() + self.delta_weight()).to(base.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        original = self._plist().original
        original.sub_(self.delta_weight().to(original.dtype))
        self.merged = False

    def _set_dense(self, dense: torch.Tensor) -> None:
        """Replace whatever stores the parameter (codes and their dequantization) by ``dense``, then adapt again."""
        target, name = self.target_module(), self.parameter_name
        parametrize.remove_parametrizations(target, name, leave_parametrized=False)
        setattr(target, name, nn.Parameter(dense, requires_grad=False))
        parametrize.register_parametrization(target, name, _Update(self), unsafe=True)
        target.parametrizations[name].original.requires_grad_(False)

    def release(self) -> nn.Module:
        """Take this update off the parameter (whatever it holds stays) and return the wrapped module."""
        target, name, plist = self.target_module(), self.parameter_name, self._plist()
        if len(plist) == 1:
            parametrize.remove_parametrizations(target, name, leave_parametrized=False)
            getattr(target, name).requires_grad_(False)
        else:
            del plist[[i for i, p in enumerate(plist) if p is self._update()][0]]
        return self.base_layer


class _Update(nn.Module):
    """Parametrization: ``W -> W + s · B_e A_e`` while its LoraParameter is active. The owner is kept out of the
    module tree (``__dict__``), so its factors are named once, under the owner."""

    def __init__(self, owner: LoraParameter):
        super().__init__()
        self.__dict__["owner"] = owner

    def forward(self, weight):
        owner = self.owner
        return weight if owner.disabled or owner.merged else owner.updated(weight)


def selects(key: str, entry: str) -> bool:
    """PEFT's rule for a ``target_parameters`` entry: the parameter's full name equals it or ends with ``"." +``
    it."""
    return key == entry or key.endswith("." + entry)


def named_parameter_targets(model: nn.Module, names: list[str]) -> list[tuple[str, str]]:
    """``(module path, parameter name)`` of each parameter ``names`` selects (:func:`selects`); in module order,
    then the module's parameter order (a parametrized tensor, e.g. stored quantized, after the plain ones)."""
    found = []
    for mpath, module in model.named_modules():
        pnames = [n for n, _ in module.named_parameters(recurse=False)]
        if parametrize.is_parametrized(module):
            pnames += list(module.parametrizations)  # by name: reading one would compute it
        found += [(mpath, p) for p in pnames if any(selects(f"{mpath}.{p}", n) for n in names)]
    return found
