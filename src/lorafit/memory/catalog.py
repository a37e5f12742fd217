"""Public shapes of popular models and memory sizes of common GPUs (data only: no weights, nothing downloaded).

Model shapes are the values of each model's published ``config.json``. GPU memory is the total the driver
reports (``nvidia-smi``), in bytes; what a process can allocate is a little less (see the estimate's
framework overhead).
"""

from __future__ import annotations

import re

from lorafit.errors import LorafitError
from lorafit.memory.spec import ModelSpec, closest

GiB = 1024**3
MiB = 1024**2


def _m(name, arch, hidden, inter, layers, heads, kv, head_dim, vocab, tied, **kw) -> ModelSpec:
    return ModelSpec(name=name, arch=arch, hidden=hidden, intermediate=inter, layers=layers, heads=heads,
                     kv_heads=kv, head_dim=head_dim, vocab=vocab, tied_embeddings=tied, **kw)


MODELS: dict[str, ModelSpec] = {m.name: m for m in [
    _m("llama-3.1-8b", "llama", 4096, 14336, 32, 32, 8, 128, 128256, False),
    _m("llama-3.1-70b", "llama", 8192, 28672, 80, 64, 8, 128, 128256, False),
    _m("llama-3.1-405b", "llama", 16384, 53248, 126, 128, 8, 128, 128256, False),
    _m("llama-3.2-1b", "llama", 2048, 8192, 16, 32, 8, 64, 128256, True),
    _m("llama-3.2-3b", "llama", 3072, 8192, 28, 24, 8, 128, 128256, True),
    _m("mistral-7b", "mistral", 4096, 14336, 32, 32, 8, 128, 32768, False),
    _m("qwen2.5-0.5b", "qwen2", 896, 4864, 24, 14, 2, 64, 151936, True, qkv_bias=True),
    _m("qwen2.5-1.5b", "qwen2", 1536, 8960, 28, 12, 2, 128, 151936, True, qkv_bias=True),
    _m("qwen2.5-3b", "qwen2", 2048, 11008, 36, 16, 2, 128, 151936, True, qkv_bias=True),
    _m("qwen2.5-7b", "qwen2", 3584, 18944, 28, 28, 4, 128, 152064, False, qkv_bias=True),
    _m("qwen2.5-14b", "qwen2", 5120, 13824, 48, 40, 8, 128, 152064, False, qkv_bias=True),
    _m("qwen2.5-32b", "qwen2", 5120, 27648, 64, 40, 8, 128, 152064, False, qkv_bias=True),
    _m("gemma-2-2b", "gemma2", 2304, 9216, 26, 8, 4, 256, 256000, True, final_logit_softcap=30.0,
       attn_logit_softcap=50.0),
    _m("gemma-2-9b", "gemma2", 3584, 14336, 42, 16, 8, 256, 256000, True, final_logit_softcap=30.0,
       attn_logit_softcap=50.0),
    _m("gemma-7b", "gemma", 3072, 24576, 28, 16, 16, 256, 256000, True),
    _m("phi-3-mini", "phi3", 3072, 8192, 32, 32, 32, 96, 32064, False),
    _m("smollm2-135m", "llama", 576, 1536, 30, 9, 3, 64, 49152, True),
    _m("smollm2-360m", "llama", 960, 2560, 32, 15, 5, 64, 49152, True),
    _m("smollm2-1.7b", "llama", 2048, 8192, 24, 32, 32, 64, 49152, True),
    _m("gpt2", "gpt2", 768, 3072, 12, 12, 12, 64, 50257, True, norm="layer", mlp="plain", max_positions=1024),
]}

# Other spellings people type (HF repo names, marketing names) -> catalog key.
MODEL_ALIASES = {
    "meta-llama/llama-3.1-8b": "llama-3.1-8b", "meta-llama/meta-llama-3.1-8b": "llama-3.1-8b",
    "llama-3.1-8b-instruct": "llama-3.1-8b", "llama3.1-8b": "llama-3.1-8b", "llama-3-8b": "llama-3.1-8b",
    "llama-3.1-70b-instruct": "llama-3.1-70b", "llama-3.2-1b-instruct": "llama-3.2-1b",
    "llama-3.2-3b-instruct": "llama-3.2-3b", "mistral-7b-v0.3": "mistral-7b", "mistral-7b-instruct": "mistral-7b",
    "phi-3-mini-4k-instruct": "phi-3-mini", "phi3-mini": "phi-3-mini", "gemma-2-2b-it": "gemma-2-2b",
    "gemma-2-9b-it": "gemma-2-9b", "smollm2-135m-instruct": "smollm2-135m", "smollm2-360m-instruct": "smollm2-360m",
    "smollm2-1.7b-instruct": "smollm2-1.7b", "gpt2-small": "gpt2",
}

# Total memory as reported by nvidia-smi, in MiB.
GPUS_MIB: dict[str, int] = {
    "rtx-3090": 24576, "rtx-4090": 24564, "rtx-4080": 16376, "t4": 15360, "l4": 23034, "a10g": 23028,
    "l40s": 46068, "a100-40gb": 40960, "a100-80gb": 81920, "h100-80gb": 81559, "h200": 143771,
}
GPUS: dict[str, int] = {k: v * MiB for k, v in GPUS_MIB.items()}
GPU_ALIASES = {"3090": "rtx-3090", "4090": "rtx-4090", "4080": "rtx-4080", "a100": "a100-80gb",
               "a100-40": "a100-40gb", "a100-80": "a100-80gb", "h100": "h100-80gb", "h100-80": "h100-80gb",
               "h200-141gb": "h200"}


def _key(name: str) -> str:
    k = name.strip().lower().replace("_", "-").replace(" ", "-")
    return re.sub(r"^(nvidia|geforce)-", "", re.sub(r"^(nvidia|geforce)-", "", k))


def get_model(name: str) -> ModelSpec:
    key = _key(name)
    short = key.split("/")[-1]
    for k in (key, short):
        if k in MODELS:
            return MODELS[k]
        if k in MODEL_ALIASES:
            return MODELS[MODEL_ALIASES[k]]
    hints = closest(short, list(MODELS))
    hint = f"; closest: {', '.join(hints)}" if hints else ""
    raise LorafitError(f"unknown model {name!r} (not a local folder, config.json or .gguf, and not in the "
                       f"catalog{hint}); `lorafit estimate --list` shows the catalog")


def gpu_memory(name: str) -> int:
    """Total memory of GPU ``name`` in bytes (``RTX 4090``, ``rtx-4090``, ``4090``, ``A100-80GB`` ...)."""
    key = _key(name)
    key = {"rtx4090": "rtx-4090", "rtx3090": "rtx-3090", "rtx4080": "rtx-4080"}.get(key, key)
    key = GPU_ALIASES.get(key, key)
    if key in GPUS:
        return GPUS[key]
    hints = closest(key, list(GPUS))
    hint = f"; closest: {', '.join(hints)}" if hints else ""
    raise LorafitError(f"unknown GPU {name!r}{hint}; known: {', '.join(GPUS)} (or give --gpu-mem 24GiB)")


_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4, "kib": 1024, "mib": MiB,
          "gib": GiB, "tib": 1024**4, "k": 1024, "m": MiB, "g": GiB}


def parse_size(text: str, what: str = "--gpu-mem") -> int:
    """``24GiB`` / ``24 GB`` / ``80g`` / ``25769803776`` -> bytes (> 0)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise LorafitError(f"{what}: {text!r} is not a size; write e.g. 24GiB, 24GB or 16g")
    value = float(m.group(1)) * _UNITS[unit]
    if value <= 0:
        raise LorafitError(f"{what}: {text!r} must be greater than zero")
    return int(value)
