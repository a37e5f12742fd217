"""Run a model's causal attention on fp32 copies where the CPU's bf16 kernels are slow, for that model only.

Registered through transformers' public attention interface as ``"lorafit_sdpa"`` and selected per model with
``set_attn_implementation``; :func:`restore` selects the model's previous implementation again. The function
takes over only the plain case — causal, no mask, no dropout, no position bias or soft-cap, equal query and key
lengths, on a CPU where the run's options say bf16 kernels are slow — and hands everything else to
transformers' SDPA function unchanged.

Its masks (:func:`lean_mask`) are SDPA's, but for two things. Rows padded on the right only (every training batch:
``lorafit.data.batching``) get no padding mask: under causal attention a real token attends only to earlier
positions, all real, so its output and every gradient are those of the masked pass (pad positions are never in the
loss). Plain causal attention then takes no mask at all, and a shared prompt's key/value-cache pass one causal mask
for all rows. And a mask that is needed (that one, left padding in generation) is made additive in the compute
dtype once per forward, one for all rows when theirs are the same. Given a boolean mask, SDPA converts it in each
layer and keeps that copy for backward, (batch × query × key) elements per layer — at 4 × 2048 tokens in bf16,
32 MiB a layer, a GiB over 32 layers.

A masked call of a grouped-query model on a CPU keeps its key/value heads (:func:`_masked_gqa`).
"""

from __future__ import annotations

import torch
from torch import nn

from lorafit._compat import attn_implementation, has_cpu_flash_attention
from lorafit.kernels import attention, matmul
from lorafit.options import RuntimeOptions
from lorafit.patches.families import attention_modules

NAME = "lorafit_sdpa"


def _plain_cpu_call(module, query, kwargs) -> bool:
    """A call of a module lorafit switched, on a CPU, with nothing SDPA's kernels do not take (a position bias, a
    soft-cap, attention weights to return)."""
    return (getattr(module, "lorafit_options", None) is not None and query.device.type == "cpu"
            and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
            and not kwargs.get("output_attentions"))


def _takes_over(module, query, key, value, attention_mask, dropout, kwargs) -> bool:
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    return (_plain_cpu_call(module, query, kwargs) and is_causal is True and attention_mask is None and not dropout
            and query.shape[2] == key.shape[2] > 1 and query.shape[-1] == key.shape[-1] == value.shape[-1]
            and query.shape[1] % key.shape[1] == 0 and query.dtype == key.dtype == value.dtype
            and matmul.upcasts(module.lorafit_options, query.dtype, query.device))


def _masked_gqa(module, query, key, attention_mask, kwargs) -> bool:
    """A masked call of a grouped-query model on a CPU, several queries (a shared prompt's cache pass, a left-padded
    prompt): transformers repeats the key/value heads for it (its ``use_gqa_in_sdpa`` allows SDPA's own grouping
    only without a mask), and backward keeps the repeated copies, (query heads / key heads) times the memory. The
    CPU kernels take a mask with grouped heads: the same outputs, the heads kept as they are."""
    return (_plain_cpu_call(module, query, kwargs) and attention_mask is not None and query.shape[2] > 1
            and key.shape[1] < query.shape[1] and query.shape[1] % key.shape[1] == 0 and attention_mask.dim() == 4
            and attention_mask.dtype in (torch.bool, query.dtype))


def lean_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _masked_gqa(module, query, key, attention_mask, kwargs):
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask[:, :, :, : key.shape[-2]], dropout_p=dropout, scale=scaling,
            enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None  # (batch, tokens, heads, head_dim), as transformers returns
    if not _takes_over(module, query, key, value, attention_mask, dropout, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = attention.HalfAttentionOnFp32.apply(query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None


def lean_mask(**kwargs):
    """transformers' SDPA mask, without the padding of rows padded on the right only, additive (see the module)."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    pad = kwargs.get("attention_mask")
    if (pad is not None and pad.dim() == 2 and not torch.compiler.is_compiling()
            and kwargs.get("mask_function", causal_mask_function) is causal_mask_function
            and kwargs.get("local_size") is None and _right_padded(pad)):
        # no real token attends to a pad: the causal mask alone (none when it is plain causal attention)
        kwargs = {**kwargs, "attention_mask": None}
    mask = sdpa_mask(**kwargs)
    if mask is None or mask.is_floating_point():
        return mask
    if mask.shape[0] > 1 and not torch.compiler.is_compiling() and bool((mask == mask[:1]).all()):
        mask = mask[:1]  # rows with the same mask share one (query × key) mask; SDPA broadcasts it
    dtype = kwargs.get("dtype", torch.float32)
    return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask.bool(), torch.finfo(dtype).min)


def _right_padded(pad) -> bool:
    """Every row's tokens first, then its padding only (a 2-D 0/1 mask)."""
    pad = pad.bool()
    return bool((pad[:, 1:] <= pad[:, :-1]).all())


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, lean_sdpa)
    AttentionMaskInterface.register(NAME, lean_mask)


def switch(model: nn.Module, options: RuntimeOptions) -> list:
    """Select the lean SDPA for ``model`` if it runs SDPA; returns what :func:`restore` takes."""
    previous = attn_implementation(model)
    if previous != "sdpa" or not has_cpu_flash_attention() or not hasattr(model, "set_attn_implementation"):
        return []
    _register()
    modules = attention_modules(model)
    for m in modules:
        m.lorafit_options = options
    model.set_attn_implementation(NAME)
    return [(model, previous, modules)]


def restore(switched: list) -> None:
    for model, previous, modules in switched:
        model.set_attn_implementation(previous)
        for m in modules:
            vars(m).pop("lorafit_options", None)
