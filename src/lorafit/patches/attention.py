"""Run a model's causal attention on fp32 copies where the CPU's bf16 kernels are slow, for that model only.

Registered through transformers' public attention interface as ``"lorafit_sdpa"`` and selected per model with
``set_attn_implementation``; :func:`restore` selects the model's previous implementation again. The function
takes over only the plain case — causal, no mask, no dropout, no position bias or soft-cap, equal query and key
lengths, on a CPU where the run's options say bf16 kernels are slow — and hands everything else to
transformers' SDPA function unchanged (the masks are SDPA's too).
"""

from __future__ import annotations

from torch import nn

from lorafit._compat import attn_implementation, has_cpu_flash_attention
from lorafit.kernels import attention, matmul
from lorafit.options import RuntimeOptions
from lorafit.patches.families import attention_modules

NAME = "lorafit_sdpa"


def _takes_over(module, query, key, value, attention_mask, dropout, kwargs) -> bool:
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    options = getattr(module, "lorafit_options", None)
    return (options is not None and is_causal is True and attention_mask is None and not dropout
            and query.device.type == "cpu" and kwargs.get("position_bias") is None
            and kwargs.get("softcap") is None and not kwargs.get("output_attentions")
            and query.shape[2] == key.shape[2] > 1 and query.shape[-1] == key.shape[-1] == value.shape[-1]
            and query.shape[1] % key.shape[1] == 0 and query.dtype == key.dtype == value.dtype
            and matmul.upcasts(options, query.dtype, query.device))


def lean_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not _takes_over(module, query, key, value, attention_mask, dropout, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = attention.HalfAttentionOnFp32.apply(query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None  # (batch, tokens, heads, head_dim), as transformers returns


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, lean_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)


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
