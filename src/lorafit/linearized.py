"""Llama 4's routed experts as one ``nn.Linear`` per expert and projection (axolotl's ``llama4_linearized_experts``).

transformers' ``Llama4TextExperts`` holds every expert in two fused 3-D tensors, ``gate_up_proj`` (experts × hidden ×
2·intermediate, read as ``x @ W``: gate columns first, then up) and ``down_proj`` (experts × intermediate × hidden).
:class:`LinearizedLlama4Experts` holds the same weights as ``gate_projs.N`` / ``up_projs.N`` / ``down_projs.N``
linear layers (``weight = W[n].T``), the module axolotl's linearized modelling defines, so LoRA can target single
experts (``experts.gate_projs.0``, or a regex such as ``.*experts\\.gate_projs\\.[0-9]+``), a 4-bit base quantizes
them like any linear layer, and checkpoints written with those names (axolotl's linearized Llama 4) load.

The swap is per model instance (:func:`linearize`), after transformers has loaded the model; nothing in transformers
is patched. :func:`save_pretrained` writes the standard fused layout back, so a merged model loads in plain
transformers (what axolotl's ``delinearize_llama4`` tool does).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from lorafit.errors import LorafitError

PROJECTIONS = ("gate_projs", "up_projs", "down_projs")
# a linearized expert's weight in a checkpoint or a state dict: (text prefix, layer, projection, expert)
_LINEAR_KEY = re.compile(r"^(.*\blayers\.(\d+)\.feed_forward\.experts)\.(gate_projs|up_projs|down_projs)\.(\d+)\.weight$")


class LinearizedLlama4Experts(nn.Module):
    """``Llama4TextExperts`` with each expert's projections as ``nn.Linear`` layers (no bias). The input arrives
    sorted by expert (``experts × tokens`` rows, as ``Llama4TextMoe`` repeats it); for expert ``n`` the output is
    ``down_projs[n](up_projs[n](x) * act(gate_projs[n](x)))``, what the fused ``bmm`` computes."""

    def __init__(self, num_experts: int, hidden_size: int, expert_dim: int, act_fn: nn.Module,
                 device=None, dtype=None):
        super().__init__()
        self.num_experts, self.hidden_size, self.expert_dim = num_experts, hidden_size, expert_dim
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_projs = nn.ModuleList(nn.Linear(hidden_size, expert_dim, **kw) for _ in range(num_experts))
        self.up_projs = nn.ModuleList(nn.Linear(hidden_size, expert_dim, **kw) for _ in range(num_experts))
        self.down_projs = nn.ModuleList(nn.Linear(expert_dim, hidden_size, **kw) for _ in range(num_experts))
        self.act_fn = act_fn

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        per_expert = hidden_states.view(self.num_experts, -1, self.hidden_size)
        out = [self.down_projs[n](self.up_projs[n](x) * self.act_fn(self.gate_projs[n](x)))
               for n, x in enumerate(per_expert)]
        return torch.stack(out).view(-1, self.hidden_size)


def is_llama4_experts(module: nn.Module) -> bool:
    return type(module).__name__ == "Llama4TextExperts"


def _linear_weight(w: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(w.contiguous(), requires_grad=like.requires_grad)


def linearized_from(fused: nn.Module) -> LinearizedLlama4Experts:
    """A :class:`LinearizedLlama4Experts` holding ``fused``'s weights exactly (transposed copies)."""
    gate_up, down = fused.gate_up_proj, fused.down_proj
    inter = fused.expert_dim
    new = LinearizedLlama4Experts(fused.num_experts, fused.hidden_size, inter, fused.act_fn, device="meta",
                                  dtype=gate_up.dtype)
    for n in range(fused.num_experts):
        new.gate_projs[n].weight = _linear_weight(gate_up[n, :, :inter].detach().T, gate_up)
        new.up_projs[n].weight = _linear_weight(gate_up[n, :, inter:].detach().T, gate_up)
        new.down_projs[n].weight = _linear_weight(down[n].detach().T, down)
    return new.train(fused.training)


def linearize(model: nn.Module) -> list[str]:
    """Replace every ``Llama4TextExperts`` of ``model`` by its :func:`linearized_from`; returns their paths. A model
    without them (not Llama 4) is one line naming the key."""
    paths = [name for name, m in model.named_modules() if is_llama4_experts(m)]
    if not paths:
        raise LorafitError(f"llama4_linearized_experts: {type(model).__name__} has no Llama 4 experts "
                           "(Llama4TextExperts); the key is for Llama 4 models, remove it")
    for name in paths:
        model.set_submodule(name, linearized_from(model.get_submodule(name)))
    model.lorafit_linearized_experts = True
    return paths


def linearized_keys(keys) -> list[str]:
    """The keys among ``keys`` that name a linearized expert's weight (``…experts.gate_projs.3.weight``)."""
    return [k for k in keys if _LINEAR_KEY.match(k)]


def load_linearized_weights(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    """Put a linearized checkpoint's expert weights (``tensors``: (checkpoint key, tensor) pairs, read one at a
    time so a large checkpoint is never held twice) into ``model``'s
    linearized experts, matched by layer, projection and expert index (the checkpoint's prefix may differ:
    ``language_model.model.layers.…`` of a multimodal checkpoint). Every expert weight must be there."""
    by_layer = {int(m.group(2)): name for name in _experts_paths(model)
                if (m := _LINEAR_KEY.match(f"{name}.gate_projs.0.weight"))}
    filled = set()
    for key, tensor in tensors:
        m = _LINEAR_KEY.match(key)
        layer, proj, expert = int(m.group(2)), m.group(3), int(m.group(4))
        if layer not in by_layer:
            raise LorafitError(f"{source}: {key} names layer {layer}, which has no Llama 4 experts in this model")
        linear = model.get_submodule(f"{by_layer[layer]}.{proj}.{expert}")
        if not tensor.is_floating_point():
            raise LorafitError(f"{source}: {key} is stored quantized ({tensor.dtype}); load a 16-bit linearized "
                               "checkpoint (or the original Llama 4) and set load_in_4bit to train it in 4 bits")
        if tensor.shape != linear.weight.shape:
            raise LorafitError(f"{source}: {key} has shape {tuple(tensor.shape)}, the model's "
                               f"{tuple(linear.weight.shape)}; the checkpoint is not this config's")
        linear.weight = nn.Parameter(tensor.to(linear.weight.dtype), requires_grad=linear.weight.requires_grad)
        filled.add(f"{by_layer[layer]}.{proj}.{expert}")
    expected = {f"{p}.{proj}.{n}" for p in by_layer.values() for proj in PROJECTIONS
                for n in range(model.get_submodule(p).num_experts)}
    if expected - filled:
        raise LorafitError(f"{source}: the linearized checkpoint has no weight for {sorted(expected - filled)[0]} "
                           f"({len(expected - filled)} expert weights missing)")


def _experts_paths(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, LinearizedLlama4Experts)]


def fused_from(linear: LinearizedLlama4Experts, text_config) -> nn.Module:
    """transformers' ``Llama4TextExperts`` holding ``linear``'s weights (the inverse of :func:`linearized_from`)."""
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

    with torch.device("meta"):
        fused = Llama4TextExperts(text_config)
    w = linear.gate_projs[0].weight
    gate_up = torch.cat([torch.stack([m.weight.detach().T for m in linear.gate_projs]),
                         torch.stack([m.weight.detach().T for m in linear.up_projs])], dim=-1)
    down = torch.stack([m.weight.detach().T for m in linear.down_projs])
    fused.gate_up_proj = nn.Parameter(gate_up.contiguous(), requires_grad=w.requires_grad)
    fused.down_proj = nn.Parameter(down.contiguous(), requires_grad=w.requires_grad)
    return fused.train(linear.training)


def save_pretrained(model: nn.Module, folder) -> None:
    """``model.save_pretrained(folder)``, with linearized experts written in the standard fused layout (what axolotl's
    ``delinearize_llama4`` writes): the folder loads in plain transformers. The experts are fused in place one layer
    at a time for the save and linearized again after, so at most one layer is held twice."""
    paths = _experts_paths(model)
    if not paths:
        model.save_pretrained(folder)
        return
    text_config = model.config.get_text_config()
    for name in paths:
        model.set_submodule(name, fused_from(model.get_submodule(name), text_config))
    try:
        model.save_pretrained(folder)
    finally:
        linearize(model)
