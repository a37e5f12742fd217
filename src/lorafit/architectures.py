"""Which models lorafit fine-tunes: decoder-only causal LMs. The one check, for ``estimate``, ``plan`` and ``train``.

A transformers ``config.json`` says what a model is through ``model_type``, ``architectures`` and
``is_encoder_decoder``. Encoder-only models (BERT), encoder-decoder models (T5) and state-space models (Mamba)
load into something with a language-model head too, but lorafit's memory model, lean kernels and loss are for
decoder-only transformers, so those are named and refused rather than treated as a Llama.
"""

from __future__ import annotations

from lorafit.errors import LorafitError

ENCODER_ONLY = frozenset({
    "bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "distilbert", "albert", "electra", "deberta", "deberta-v2",
    "camembert", "modernbert", "mpnet", "funnel", "longformer", "big_bird", "ernie", "rembert", "esm", "nomic_bert",
})
ENCODER_DECODER = frozenset({
    "t5", "mt5", "umt5", "bart", "mbart", "pegasus", "pegasus_x", "marian", "led", "prophetnet", "blenderbot",
    "blenderbot-small", "longt5", "switch_transformers", "whisper", "fsmt", "m2m_100", "nllb-moe", "plbart",
    "t5gemma", "encoder-decoder",
})
STATE_SPACE = frozenset({"mamba", "mamba2", "rwkv", "falcon_mamba", "jamba", "zamba", "zamba2", "bamba"})

_KINDS = ((ENCODER_ONLY, "an encoder-only model"), (ENCODER_DECODER, "an encoder-decoder model"),
          (STATE_SPACE, "a state-space model"))
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def unsupported_reason(hf_config: dict) -> str | None:
    """Why the model a ``config.json`` mapping describes is not a decoder-only causal LM; None when it is one."""
    model_type = str(hf_config.get("model_type", "")).lower()
    for family, words in _KINDS:
        if model_type in family:
            return f"{model_type} is {words}"
    if hf_config.get("is_encoder_decoder"):
        return f"{model_type or 'this model'} is an encoder-decoder model"
    names = [str(a) for a in hf_config.get("architectures") or []]
    if names and not any(a.endswith(_CAUSAL_SUFFIXES) for a in names):
        return f"{names[0]} is not a causal language model"
    return None


def check_causal_lm(hf_config: dict, source: str) -> None:
    """Raise a one-line error naming ``source`` when the model is not one lorafit can fine-tune."""
    reason = unsupported_reason(hf_config)
    if reason:
        raise LorafitError(f"{source}: {reason}; lorafit fine-tunes decoder-only causal LMs "
                           "(Llama, Mistral, Qwen, Gemma, Phi, GPT-2, SmolLM ...)")
