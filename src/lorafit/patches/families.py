"""Which lean kernels each model family takes, by ``config.model_type`` and module class name.

An entry names the transformers classes whose ``forward`` computes exactly what the kernel does: Llama's
RMSNorm (``weight * normalize(x)``, not Gemma's ``(1 + weight) * …``), the gated MLP
``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, and a modelling module whose ``apply_rotary_pos_emb`` and
``rotate_half`` are Llama's. ``tests/test_patches.py`` checks every entry against the installed transformers'
source, so an upstream change fails a test instead of silently computing something else. A family that is
not listed trains on the plain path (LoRA layers only) and says so once.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    rms_norm: tuple[str, ...] = ()  # RMSNorm classes computed as Llama's
    gated_mlp: tuple[str, ...] = ()  # MLP classes computing down(act(gate(x)) * up(x))
    rope: bool = False  # the family's modelling module applies RoPE with Llama's functions


def _llama_like(prefix: str) -> Family:
    return Family(rms_norm=(f"{prefix}RMSNorm",), gated_mlp=(f"{prefix}MLP",), rope=True)


FAMILIES: dict[str, Family] = {
    "llama": _llama_like("Llama"),
    "mistral": _llama_like("Mistral"),
    "ministral": _llama_like("Ministral"),
    "qwen2": _llama_like("Qwen2"),
    "qwen3": _llama_like("Qwen3"),
    "granite": _llama_like("Granite"),
    "smollm3": _llama_like("SmolLM3"),
    "mixtral": Family(rms_norm=("MixtralRMSNorm",), rope=True),  # experts are not a plain gated MLP
    "phi3": Family(rms_norm=("Phi3RMSNorm",)),  # fused gate_up MLP, partial RoPE
    "gemma": Family(gated_mlp=("GemmaMLP",), rope=True),  # (1 + weight) RMSNorm
    "gemma2": Family(gated_mlp=("Gemma2MLP",), rope=True),
    "gemma3_text": Family(gated_mlp=("Gemma3MLP",), rope=True),
    "olmo": Family(gated_mlp=("OlmoMLP",)),
    "olmo2": Family(gated_mlp=("Olmo2MLP",)),
    "cohere": Family(gated_mlp=("CohereMLP",)),
}


def attention_modules(model) -> list:
    """The attention blocks of a transformers model (``LlamaAttention``, ``GPT2Attention``, ...): the modules
    that call RoPE and the attention function."""
    return [m for m in model.modules() if type(m).__name__.endswith("Attention")]


def family_of(model) -> tuple[str, Family | None]:
    """``(model_type, its Family or None)`` for a transformers model."""
    model_type = str(getattr(getattr(model, "config", None), "model_type", "") or "")
    return model_type, FAMILIES.get(model_type)
