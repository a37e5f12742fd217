"""The validated config: :class:`TrainConfig` and the :class:`DatasetSpec` entries of its ``datasets``."""

from __future__ import annotations

import difflib
import math
import re
import typing
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

from lorafit.config import deepspeed as zero
from lorafit.config.keys import (
    ALLOWED,
    BNB_KWARGS,
    CHAT_TEMPLATE_NAMES,
    DATASET_TYPE_ALIASES,
    DATASET_TYPES,
    DEMO_ALIASES,
    FALLBACK_PREFIX,
    KTO_TYPES,
    PREFERENCE_TYPES,
    RL_KINDS,
    SUPPORTED_OPTIMIZERS,
    screen_keys,
)
from lorafit.config.messages import kind, one_line
from lorafit.config.unfrozen import Pattern
from lorafit.errors import LorafitError
from lorafit.options import RuntimeOptions

# the tokenizer attributes ``special_tokens`` may set (transformers' names, as axolotl takes them)
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token")


def _substitute_attention(data: dict) -> list[str]:
    """axolotl's attention choices that are exact attention run by a library lorafit does not load (xformers, a
    Hub kernel such as ``kernels-community/vllm-flash-attn3``, fetched at run time): the same math through
    transformers' sdpa, with a notice."""
    value = data.get("attn_implementation")
    if value == "xformers":
        data["attn_implementation"] = "sdpa"
        return ["attn_implementation xformers: runs as sdpa (xformers' memory-efficient attention is exact "
                "attention; torch's sdpa computes the same)"]
    if isinstance(value, str) and "/" in value:
        data["attn_implementation"] = "sdpa"
        return [f"attn_implementation {value}: runs as sdpa (a Hub attention kernel is downloaded at run time "
                "and lorafit downloads nothing; sdpa computes the same exact attention)"]
    return []


def _template_name_error(cfg: TrainConfig) -> str | None:
    """A bare chat_template name (no jinja, not a file of the config's folder) must be tokenizer_default or one of
    axolotl's template names, so a config naming a template lorafit lacks stops at once, not when data is read."""
    value = cfg.chat_template
    if value is None or not re.fullmatch(r"[A-Za-z0-9_.-]+", value) or value == "tokenizer_default":
        return None
    if value.removeprefix(FALLBACK_PREFIX) in CHAT_TEMPLATE_NAMES or cfg.resolve_path(value).is_file():
        return None
    close = difflib.get_close_matches(value.removeprefix(FALLBACK_PREFIX), CHAT_TEMPLATE_NAMES, n=1)
    return (f"key 'chat_template': got {value!r}, not a template name" + (f" (did you mean {close[0]}?)" if close else "")
            + " or a file; use tokenizer_default, one of axolotl's template names (chatml, llama3, qwen3, gemma3, "
            "...), a path to a .jinja file, or jinja text")


def _template_name_notice(cfg: TrainConfig) -> list[str]:
    """A family's template name (not chatml or llama3, which lorafit writes) is read as the tokenizer's own."""
    name = (cfg.chat_template or "").removeprefix(FALLBACK_PREFIX)
    if name not in CHAT_TEMPLATE_NAMES or name in ("chatml", "llama3") or cfg.resolve_path(name).is_file():
        return []
    return [f"chat_template: {name}: the tokenizer's own chat template is used (lorafit does not bundle a copy of "
            f"axolotl's {name} template); give a .jinja file to use another"]


class DatasetSpec(BaseModel):
    """One entry of ``datasets`` / ``test_datasets`` (axolotl's names)."""

    model_config = ConfigDict(extra="forbid")

    path: str
    # alpaca:chat / :chatml / :phi: axolotl's AlpacaPrompter in that prompt style; the preference types (rl: dpo /
    # orpo / kto) are lorafit.data.preference's (the list: config.keys.DATASET_TYPES)
    type: Literal[DATASET_TYPES]
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
    train_on_eos: Literal["turn", "all", "last", "none"] | None = None  # None: the top-level key, else "turn"
    # the end-of-turn tokens that are not EOS (eot_tokens, <|eot_id|> ...): same choices; None: train_on_eos's
    train_on_eot: Literal["turn", "all", "last", "none"] | None = None
    drop_system_message: bool = False  # chat rows: leave system messages out
    message_field_training: str | None = None  # a message's true/false training flag (None: the field "train")
    # assistant messages: <think>…</think> (and axolotl's other pairs) moved into template_thinking_key
    split_thinking: bool = False
    template_thinking_key: str = "reasoning_content"
    field_thinking: str | None = None  # the messages' reasoning field (None: template_thinking_key's name)
    # preference rows (rl): the fields holding the preferred and the rejected completion
    field_chosen: str = "chosen"
    field_rejected: str = "rejected"
    # completion rows
    field: str | None = None
    encoding: str | None = None  # text files' codec (latin-1, cp1252, utf-16 ...); None: UTF-8, BOM or not

    @field_validator("type", mode="before")
    @classmethod
    def _type_alias(cls, v: Any) -> Any:
        return DATASET_TYPE_ALIASES.get(v, v) if isinstance(v, str) else v

    @field_validator("encoding")
    @classmethod
    def _check_encoding(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                b"\n".decode(v, "replace")  # looks the codec up: unknown and bytes-only codecs (base64) fail
            except LookupError:
                raise ValueError("must be a text encoding, e.g. utf-8, latin-1, cp1252 or utf-16") from None
        return v

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


def four_bit_settings(adapter: str | None, load_in_4bit: bool | None, bnb_config_kwargs: dict | None) -> dict | None:
    """The 4-bit base these keys ask for (``lorafit.models.quantize_base``'s arguments), or None for a dense base.
    adapter: qlora takes axolotl's defaults (NF4, double quantization) and its bnb_config_kwargs; load_in_4bit
    under adapter: lora gets what axolotl's loader got there, transformers' load_in_4bit defaults."""
    if not load_in_4bit:
        return None
    if adapter != "qlora":
        return {"quant_type": "fp4", "double_quant": False}
    kw = bnb_config_kwargs or {}
    return {"quant_type": kw.get("bnb_4bit_quant_type", "nf4"),
            "double_quant": bool(kw.get("bnb_4bit_use_double_quant", True))}


class TrainConfig(BaseModel):
    """A validated training config. Build it with :func:`load_config` or :meth:`from_dict`."""

    model_config = ConfigDict(extra="forbid")

    # model and tokenizer
    base_model: str
    tokenizer_config: str | None = None
    chat_template: str | None = None
    chat_template_jinja: str | None = None
    # how transformers runs attention (None: sdpa; lorafit's lean CPU attention takes over sdpa where it helps)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"] | None = None
    special_tokens: dict[str, str] | None = None  # bos/eos/pad/unk_token ...: set on the tokenizer (new ones resize)
    # chat rows: extra end-of-turn tokens, the default train_on_eos of every entry, a system message for rows without one
    eot_tokens: list[str] | None = None
    train_on_eos: Literal["turn", "all", "last", "none"] | None = None
    default_system_message: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # extra variables for the chat template (enable_thinking ...)

    # adapter
    adapter: str | None = None
    # QLoRA: the base's linear layers in 4 bits (bitsandbytes); bnb_config_kwargs: axolotl's overrides of the
    # quantization (bnb_4bit_quant_type nf4/fp4, bnb_4bit_use_double_quant), see BNB_KWARGS
    load_in_4bit: bool = False
    # LoRA over an 8-bit base: the same linear layers as bitsandbytes Linear8bitLt (LLM.int8), as axolotl passes
    # load_in_8bit on to transformers' loader
    load_in_8bit: bool = False
    # MoE models: the routed experts' 3-D tensors in 4 or 8 bits too (load_in_4bit / load_in_8bit decides),
    # dequantized when read; they are no linear layers, so the quantized base above does not reach them
    quantize_moe_experts: bool = False
    bnb_config_kwargs: dict[str, Any] | None = None
    # axolotl's quantized-checkpoint keys: Mxfp4Config with dequantize: true only (an MXFP4 checkpoint such as
    # gpt-oss dequantized to the training dtype as it loads; lorafit.models does so for every MXFP4 checkpoint)
    model_quantization_config: str | None = None
    model_quantization_config_kwargs: dict[str, Any] | None = None
    # Llama 4: each routed expert as three nn.Linear layers (gate_projs.N, up_projs.N, down_projs.N), as axolotl's
    # linearized modelling; LoRA can then target single experts (lorafit.linearized)
    llama4_linearized_experts: bool = False
    lora_r: int = Field(8, gt=0)
    lora_alpha: float = Field(16, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_target_modules: list[str] | str | None = None
    lora_target_linear: bool = False
    lora_modules_to_save: list[str] | None = None
    peft_use_rslora: bool = False
    peft_use_dora: bool = False  # DoRA (PEFT's use_dora): a trained magnitude per output row
    lora_init: Literal["kaiming", "gaussian", "pissa"] = "kaiming"
    lora_layers_to_transform: list[int] | None = None  # axolotl's peft_layers_to_transform is read as this
    # per-module rank / alpha: module name or regex (matched at the end of the path, as PEFT does) -> value
    lora_rank_pattern: dict[str, int] | None = None
    lora_alpha_pattern: dict[str, float] | None = None
    # PEFT's target_parameters: parameters adapted in place, for MoE experts' 3-D tensors (no dropout, no DoRA)
    lora_target_parameters: list[str] | None = None
    # full fine-tuning of the parameters these patterns select, every other one frozen (lorafit.train.freeze)
    unfrozen_parameters: list[str] | None = None
    lora_model_dir: str | None = None  # start from this adapter folder (relative to the config's folder)

    # data
    datasets: list[DatasetSpec] = Field(min_length=1)
    test_datasets: list[DatasetSpec] | None = None
    val_set_size: int | float = 0.0
    sequence_len: int = Field(2048, ge=2)
    sample_packing: bool = False
    curriculum_sampling: bool = False  # axolotl's: read the rows in the data's order, not shuffled
    dataset_exact_deduplication: bool = False  # axolotl's: drop samples identical to an earlier one (ids and labels)
    pad_to_sequence_len: bool = False
    train_on_inputs: bool = False
    skip_bad_rows: bool = False

    # preference training (lorafit.train.preference): DPO's beta (TRL's default 0.1) and cDPO's label smoothing;
    # ORPO's weight of the odds-ratio term (axolotl's orpo_alpha, TRL's ORPO beta, default 0.1)
    rl: str | None = None
    rl_beta: float | None = Field(None, gt=0)
    orpo_alpha: float | None = Field(None, gt=0)
    # KTO: the weights of the desirable and the undesirable rows' losses (TRL's defaults 1.0)
    kto_desirable_weight: float | None = Field(None, gt=0)
    kto_undesirable_weight: float | None = Field(None, gt=0)

    # optimisation
    # "auto": the largest micro-batch whose estimated peak fits the device (lorafit.train.auto_batch), keeping
    # batch_size (samples per optimizer step) with the accumulation steps that make it up
    micro_batch_size: int | Literal["auto"] = 1
    gradient_accumulation_steps: int | Literal["auto"] = 1
    batch_size: int | None = Field(None, ge=1)
    max_memory: str | int | dict[str, str | int] | None = None  # the budget "auto" sizes for (default: what is free)
    num_epochs: float = Field(1, gt=0)
    max_steps: int | None = Field(None, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float | None = Field(None, ge=0, lt=1)
    optimizer: str = "adamw_torch"
    weight_decay: float = Field(0.0, ge=0)
    # LoRA+ (Hayou et al. 2024), as axolotl runs it through PEFT's create_loraplus_optimizer: LoRA's B matrices
    # (and 1-D parameters) at learning_rate × loraplus_lr_ratio, LoRA on embeddings at loraplus_lr_embedding
    loraplus_lr_ratio: float | None = Field(None, gt=0)
    loraplus_lr_embedding: float | None = Field(None, gt=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, ge=0)
    # offload (axolotl's): checkpointing with each layer's saved input in host memory (transformers' offload)
    gradient_checkpointing: bool | Literal["offload"] = False
    loss_chunk_tokens: int | None = Field(None, ge=1)  # lorafit: tokens per loss chunk (None: sized to the vocab)
    bf16: bool | Literal["auto"] = False
    # lorafit: how the lean kernels run (None: the LORAFIT_COMPILE / LORAFIT_HALF_MATMUL environment, else the
    # defaults: "auto" for both); see lorafit.options
    compile_kernels: bool | Literal["auto"] | None = None
    half_matmul: Literal["auto", "native", "fp32"] | None = None
    # lorafit: run the tokens every row of a batch starts with once (None: LORAFIT_SHARED_PREFIX, else true)
    shared_prefix: bool | None = None
    fp16: bool = False
    tf32: bool | None = None
    # several processes (torchrun): DDP by default; FSDP2 (fully_shard per decoder layer) when any of axolotl's
    # fsdp keys is set. fsdp: axolotl's list of options (full_shard ...), fsdp_config: its dict; lorafit reads
    # reshard_after_forward from it, and fsdp_version must be 2 when given
    fsdp: list[str] | str | None = None
    fsdp_config: dict[str, Any] | None = None
    fsdp_version: int | None = None
    # axolotl's DeepSpeed config (a JSON path or mapping): only its ZeRO stage is read, mapped onto FSDP2 (stage 3)
    # or DDP (lorafit.config.deepspeed)
    deepspeed: str | dict[str, Any] | None = None

    # evaluation, checkpoints, logging
    eval_steps: int | None = Field(None, ge=1)
    # "no": no evaluation while training, not even at the end (``lorafit eval`` scores the split); "steps" and
    # "epoch" evaluate as eval_steps / evals_per_epoch say (HF's values, as axolotl passes them on); "epoch"
    # without either evaluates at the end of each epoch, as HF's Trainer does
    eval_strategy: Literal["no", "steps", "epoch"] | None = None
    evals_per_epoch: int | None = Field(None, ge=0)
    save_steps: int | None = Field(None, ge=1)
    saves_per_epoch: int | None = Field(None, ge=0)
    save_total_limit: int | None = Field(None, ge=1)  # keep only the newest N checkpoints
    logging_steps: int = Field(1, ge=1)
    output_dir: str = "./lora-out"
    seed: int = 42
    resume_from_checkpoint: str | None = None

    _notices: list[str] = PrivateAttr(default_factory=list)
    _zero_stage: int | None = PrivateAttr(default=None)
    _config_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _source: str = PrivateAttr(default="<config>")

    # ---- field checks (messages are completed by _one_line) ----
    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        """``lora_r: true`` must not become r = 1: pydantic's lax mode turns a boolean into 1 or 0."""
        if isinstance(data, dict):
            for key, value in data.items():
                if isinstance(value, bool) and key in _NUMBER_KEYS:
                    raise ValueError(f"key '{key}': got {str(value).lower()}, must be a number, not true/false")
        return data

    @field_validator("adapter")
    @classmethod
    def _check_adapter(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = str(v).lower()
        if v not in ("lora", "qlora", "none", ""):
            raise ValueError("must be 'lora', 'qlora' or 'none' (empty = full fine-tuning)")
        return v if v in ("lora", "qlora") else None

    @field_validator("rl", mode="before")
    @classmethod
    def _check_rl(cls, v: Any) -> Any:
        if v is None:
            return None
        name = str(v).lower()
        if name not in RL_KINDS:
            raise ValueError(f"lorafit trains rl: {', '.join(RL_KINDS)}; other RL methods (ipo, simpo, grpo ...) "
                             "are not supported")
        return name

    @field_validator("optimizer")
    @classmethod
    def _check_optimizer(cls, v: str) -> str:
        if v in SUPPORTED_OPTIMIZERS:
            return v
        if "8bit" in v or "paged" in v or "bnb" in v:
            raise ValueError(f"this low-bit/paged optimizer is not supported; use adamw_8bit, adamw_torch_8bit, "
                             f"adamw_torch_4bit, paged_adamw_8bit or paged_adamw_32bit (supported: {', '.join(SUPPORTED_OPTIMIZERS)})")
        raise ValueError(f"not supported yet, use adamw_torch (supported: {', '.join(SUPPORTED_OPTIMIZERS)})")

    @field_validator("bnb_config_kwargs")
    @classmethod
    def _check_bnb(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        for key, value in (v or {}).items():
            allowed = BNB_KWARGS.get(key)
            if allowed is None:
                raise ValueError(f"has {key!r}; lorafit reads: {', '.join(BNB_KWARGS)}")
            if allowed and value not in allowed:
                raise ValueError(f"{key}: got {value!r}, allowed: {', '.join(map(str, allowed))}")
        return v

    @field_validator("unfrozen_parameters")
    @classmethod
    def _check_unfrozen(cls, v: list[str] | None) -> list[str] | None:
        for pattern in v or []:
            Pattern.parse(pattern)  # a bad expression or range is one line now, not after the model has loaded
        return v

    @field_validator("val_set_size")
    @classmethod
    def _check_val_set_size(cls, v: int | float) -> int | float:
        if isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise ValueError(ALLOWED["val_set_size"])
        if v >= 1:
            if float(v) != int(v):
                raise ValueError(ALLOWED["val_set_size"])
            return int(v)
        return float(v)

    @field_validator("special_tokens")
    @classmethod
    def _check_special_tokens(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        unknown = sorted(set(v or {}) - set(SPECIAL_TOKEN_KEYS))
        if unknown:
            raise ValueError(f"has {unknown[0]!r}; its keys may be: {', '.join(SPECIAL_TOKEN_KEYS)}")
        if any(not t for t in (v or {}).values()):
            raise ValueError("has an empty token; give the token's text, e.g. pad_token: \"<|pad|>\"")
        return v

    @field_validator("lora_target_modules")
    @classmethod
    def _check_targets(cls, v: list[str] | str | None) -> list[str] | str | None:
        if isinstance(v, str):
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"is not a valid regex ({e})") from None
        return v

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _check_checkpointing(cls, v: Any) -> Any:
        if v == "offload_disk":
            raise ValueError("offloading activations to disk is not supported; use offload (layer inputs in host "
                             "memory) or true")
        return v

    @field_validator("micro_batch_size", "gradient_accumulation_steps")
    @classmethod
    def _check_batch(cls, v: int | str) -> int | str:
        if v != "auto" and v < 1:
            raise ValueError("must be an integer >= 1 or auto")
        return v

    @model_validator(mode="after")
    def _check_batch_sizes(self) -> TrainConfig:
        micro, accum, total = self.micro_batch_size, self.gradient_accumulation_steps, self.batch_size
        if micro == "auto" or accum == "auto":
            if total is None:
                raise ValueError(f"{'micro_batch_size' if micro == 'auto' else 'gradient_accumulation_steps'} is auto: "
                                 "set batch_size, the samples per optimizer step it keeps")
            if micro != "auto" and total % micro:
                raise ValueError(f"batch_size {total} is not a multiple of micro_batch_size {micro}")
            if micro == "auto" and accum != "auto" and "gradient_accumulation_steps" in self.model_fields_set:
                raise ValueError("micro_batch_size is auto: leave gradient_accumulation_steps out (or auto); "
                                 "lorafit sets it to batch_size / micro_batch_size")
        elif total is not None and "gradient_accumulation_steps" not in self.model_fields_set:
            # axolotl: gradient_accumulation_steps defaults to batch_size // micro_batch_size
            if total % micro:
                raise ValueError(f"batch_size {total} is not a multiple of micro_batch_size {micro}")
            self.gradient_accumulation_steps = total // micro
        elif total is not None and total != micro * accum:
            raise ValueError(f"batch_size {total} is not micro_batch_size × gradient_accumulation_steps "
                             f"({micro} × {accum}); set two of the three")
        return self

    @model_validator(mode="after")
    def _check_combinations(self) -> TrainConfig:
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("warmup_steps and warmup_ratio are both set; keep one")
        if self.is_lora and not (self.lora_target_modules or self.lora_target_linear or self.lora_target_parameters):
            raise ValueError(
                "adapter is lora but no target modules are given; set lora_target_linear: true "
                "(all linear layers) or lora_target_modules: [q_proj, v_proj, ...]"
            )
        if self.lora_target_parameters and self.lora_dropout:
            raise ValueError(f"lora_dropout {self.lora_dropout} with lora_target_parameters: a parameter's update "
                             "cannot take dropout (PEFT refuses it too); set lora_dropout: 0")
        if self.lora_model_dir and not self.is_lora:
            raise ValueError("lora_model_dir is set but adapter is not lora; set adapter: lora to continue an adapter")
        self._check_four_bit()
        self._check_model_quantization()
        self._check_preference()
        self._check_fsdp()
        self._check_fp16()
        if self.lora_model_dir and self.lora_init == "pissa":
            raise ValueError("lora_model_dir and lora_init: pissa cannot be combined (PiSSA rewrites the base "
                             "weights); drop lora_init")
        if self.peft_use_dora and self.lora_init == "pissa":
            raise ValueError("peft_use_dora and lora_init: pissa cannot be combined; use lora_init kaiming or gaussian")
        if self.test_datasets and self.val_set_size:
            raise ValueError("test_datasets and val_set_size are both set; use one source of eval data")
        if self.chat_template == "jinja":
            if not self.chat_template_jinja:
                raise ValueError("chat_template is 'jinja' but chat_template_jinja is empty")
            self.chat_template = self.chat_template_jinja
        return self

    def _check_preference(self) -> None:
        """rl needs datasets of its kind (and the preference types need rl), unpacked rows, and an adapter for DPO
        and KTO: their reference is the base with the adapter switched off, so full fine-tuning would need a second
        copy of the model."""
        entries = [*self.datasets, *(self.test_datasets or [])]
        if not self.rl:
            pref = next((d for d in entries if d.type in PREFERENCE_TYPES + KTO_TYPES), None)
            if pref is not None:
                raise ValueError(f"dataset type {pref.type} holds preference data; set rl: dpo, orpo or kto to train "
                                 "on it, or use a supervised type (chat_template, alpaca ...)")
            return
        types = KTO_TYPES if self.rl == "kto" else PREFERENCE_TYPES
        for d in entries:
            if d.type == "chat_template" and self.rl != "kto":  # axolotl: under rl, chat_template.default
                d.type = "chat_template.default"
            elif d.type not in types:
                raise ValueError(f"rl: {self.rl} reads datasets of type {', '.join(types)}; got type {d.type}")
        if self.sample_packing:
            raise ValueError(f"rl: {self.rl} with sample_packing: preference rows are not packed; set "
                             "sample_packing: false")
        if self.fsdp_enabled:
            raise ValueError(f"rl: {self.rl} with {self._fsdp_origin} is not supported yet; {self._ddp_instead} "
                             "(several processes then train with DDP)")
        if self.rl in ("dpo", "kto") and not self.is_lora:
            raise ValueError(f"rl: {self.rl} with full fine-tuning needs a second, frozen copy of the model as the "
                             "reference, which lorafit does not keep; use adapter: lora or qlora (the reference is then "
                             "the base with the adapter disabled)")
        if self.rl == "kto" and self.micro_batch_size != "auto" and self.micro_batch_size < 2:
            raise ValueError("rl: kto estimates its KL term from the other rows of a micro-batch (as TRL); set "
                             "micro_batch_size to 2 or more")

    def _check_four_bit(self) -> None:
        """axolotl's rules: qlora needs load_in_4bit, a 4-bit base needs an adapter, and DoRA a dense base."""
        if self.load_in_8bit:  # first: its own lines are more precise than the 4-bit ones below
            self._check_eight_bit()
        if self.adapter == "qlora" and not self.load_in_4bit:
            raise ValueError("adapter is qlora but load_in_4bit is not set; add load_in_4bit: true")
        if self.load_in_4bit and not self.is_lora:
            raise ValueError("load_in_4bit needs adapter: qlora; full fine-tuning cannot train a 4-bit base")
        if self.load_in_4bit and (self.peft_use_dora or self.lora_init == "pissa"):
            raise ValueError(f"load_in_4bit and {'peft_use_dora' if self.peft_use_dora else 'lora_init: pissa'} cannot "
                             "be combined (they need the dense base weight); use plain QLoRA or a bf16/fp32 base")
        if self.quantize_moe_experts and self.llama4_linearized_experts:
            raise ValueError("quantize_moe_experts with llama4_linearized_experts: the linearized experts are linear "
                             "layers, which load_in_4bit / load_in_8bit quantize with the base; remove "
                             "quantize_moe_experts")
        if self.quantize_moe_experts and not (self.load_in_4bit or self.load_in_8bit):
            raise ValueError("quantize_moe_experts needs a quantized base (as in axolotl): add load_in_4bit: true "
                             "(adapter: qlora) or load_in_8bit: true (adapter: lora)")

    def _check_model_quantization(self) -> None:
        """axolotl's model_quantization_config: what lorafit runs of it is MXFP4 dequantized on load."""
        name, kw = self.model_quantization_config, self.model_quantization_config_kwargs
        if name is None:
            if kw:
                raise ValueError("model_quantization_config_kwargs is set without model_quantization_config; add "
                                 "model_quantization_config: Mxfp4Config or remove the kwargs")
            return
        if name != "Mxfp4Config":
            raise ValueError(f"model_quantization_config {name}: only Mxfp4Config (with "
                             "model_quantization_config_kwargs: {dequantize: true}) is supported; for other quantized "
                             "bases use adapter: qlora with load_in_4bit: true, or a bf16/fp32 base")
        if (kw or {}).get("dequantize") is not True or set(kw) - {"dequantize"}:
            raise ValueError("model_quantization_config Mxfp4Config needs model_quantization_config_kwargs: "
                             "{dequantize: true} and nothing else: lorafit trains the experts dequantized (MXFP4 "
                             "compute needs triton kernels on a GPU)")
        if self.load_in_4bit or self.load_in_8bit:
            raise ValueError("model_quantization_config with load_in_4bit or load_in_8bit: they cannot be combined "
                             "(axolotl refuses it too); keep one")

    def _check_eight_bit(self) -> None:
        """load_in_8bit is LoRA over an int8 base; what lorafit does not implement over it is one line."""
        if self.load_in_4bit:
            raise ValueError("load_in_8bit and load_in_4bit are both set; keep one (load_in_4bit with adapter: qlora "
                             "for QLoRA)")
        if not self.is_lora:
            raise ValueError("load_in_8bit needs adapter: lora; full fine-tuning cannot train an 8-bit base")
        if self.adapter == "qlora":
            raise ValueError("load_in_8bit with adapter: qlora: QLoRA is a 4-bit base; use load_in_4bit: true, or "
                             "adapter: lora for LoRA over an 8-bit base")
        if self.peft_use_dora or self.lora_init == "pissa":
            raise ValueError(f"load_in_8bit and {'peft_use_dora' if self.peft_use_dora else 'lora_init: pissa'} cannot "
                             "be combined (they need the dense base weight); use plain LoRA or a bf16/fp32 base")

    def _check_fsdp(self) -> None:
        if not self.fsdp_enabled:
            return
        if self.fsdp_version not in (None, 2):
            raise ValueError(f"fsdp_version {self.fsdp_version}: lorafit shards with FSDP2 only; set fsdp_version: 2")
        if not self.is_lora:
            raise ValueError(f"full fine-tuning with {self._fsdp_origin} is not supported yet; use adapter: lora, or "
                             f"{self._ddp_instead} to train with DDP")

    @property
    def _fsdp_origin(self) -> str:
        return "FSDP2 (deepspeed ZeRO-3 maps to it here)" if self._zero_stage == 3 else "FSDP2"

    @property
    def _ddp_instead(self) -> str:
        return "a ZeRO-1/2 deepspeed config" if self._zero_stage == 3 else "drop the fsdp keys"

    @property
    def fsdp_enabled(self) -> bool:
        """FSDP2 asked for: any of axolotl's fsdp keys set (``fsdp_version: 2``, ``fsdp:``, ``fsdp_config:``), or a
        DeepSpeed config of ZeRO stage 3."""
        return bool(self.fsdp or self.fsdp_config or self.fsdp_version) or self._zero_stage == 3

    def _check_fp16(self) -> None:
        """fp16 trains fp32 LoRA weights over an fp16 base with loss scaling (torch's GradScaler, as HF's Trainer
        does). A trainable fp16 tensor cannot be unscaled (HF refuses it: "Attempting to unscale FP16
        gradients"), and lorafit keeps no fp32 master copy of base weights: full fine-tuning and
        lora_modules_to_save are refused rather than trained in pure fp16, whose updates underflow."""
        if not self.fp16 or self.bf16 is True:  # bf16: true wins over fp16, as in axolotl (a notice says so)
            return
        if not self.is_lora:
            raise ValueError("fp16 with full fine-tuning is not supported (fp16 weights cannot be trained under "
                             "loss scaling); use bf16: true, fp32 (fp16: false), or adapter: lora")
        if self.lora_modules_to_save:
            raise ValueError("fp16 with lora_modules_to_save is not supported (those modules would train in fp16, "
                             "which loss scaling cannot unscale); use bf16: true or fp32 (fp16: false)")
        if self.fsdp_enabled:
            raise ValueError(f"fp16 with {self._fsdp_origin} is not supported (the loss scale's overflow check would "
                             f"see one shard of the gradients per rank); use bf16: true, or {self._ddp_instead} for DDP")

    def _precision_notices(self) -> list[str]:
        if self.fp16 and self.bf16 is True:
            return ["fp16: ignored: bf16 is true, and bf16 wins, as in axolotl (it trains in bf16 then)"]
        return []

    def _four_bit_notices(self) -> list[str]:
        if self.adapter == "lora" and self.load_in_4bit:
            return ["load_in_4bit with adapter: lora: the base is loaded in 4 bits with transformers' load_in_4bit "
                    "defaults (fp4, no double quantization), as axolotl does (it passes load_in_4bit on); "
                    "set adapter: qlora for NF4 with double quantization"]
        if self.bnb_config_kwargs and self.adapter != "qlora":
            return ["bnb_config_kwargs: ignored: it applies to adapter: qlora with load_in_4bit, as in axolotl"]
        dtype = (self.bnb_config_kwargs or {}).get("bnb_4bit_compute_dtype")
        if self.adapter == "qlora" and dtype is not None:
            return [f"bnb_config_kwargs.bnb_4bit_compute_dtype {dtype}: ignored: the 4-bit base computes in the "
                    "run's dtype (bf16, fp16 or fp32, set by bf16 / fp16)"]
        return []

    def _preference_notices(self) -> list[str]:
        """What the preference keys mean in this run; lora_dropout is switched off under rl, as TRL's trainers do
        by default (axolotl runs them so), so the policy and the reference see the same network."""
        notes = []
        if self.rl and self.lora_dropout:
            notes.append(f"lora_dropout {self.lora_dropout}: not applied under rl: {self.rl} (TRL disables dropout in "
                         "preference training, as axolotl runs it)")
            self.lora_dropout = 0.0
        if self.rl != "orpo" and self.orpo_alpha is not None:
            notes.append("orpo_alpha: ignored: it applies with rl: orpo")
        for key in ("kto_desirable_weight", "kto_undesirable_weight"):
            if self.rl != "kto" and getattr(self, key) is not None:
                notes.append(f"{key}: ignored: it applies with rl: kto")
        if self.rl == "orpo" and self.rl_beta is not None and self.orpo_alpha is not None:
            notes.append(f"orpo_alpha {self.orpo_alpha}: ignored: rl_beta {self.rl_beta} is ORPO's weight when both are "
                         "set, as axolotl passes them to TRL")
        if not self.rl and self.rl_beta is not None:
            notes.append("rl_beta: ignored: it applies with rl: dpo, orpo or kto")
        return notes

    @property
    def dpo_beta(self) -> float:
        """DPO's (and KTO's) beta: rl_beta, else TRL's default 0.1."""
        return self.rl_beta if self.rl_beta is not None else 0.1

    @property
    def orpo_weight(self) -> float:
        """ORPO's weight of the odds-ratio term (TRL's ORPO beta): rl_beta, else orpo_alpha (axolotl's order),
        else TRL's default 0.1."""
        return next((v for v in (self.rl_beta, self.orpo_alpha) if v is not None), 0.1)

    def _unfrozen_notices(self) -> list[str]:
        if self.unfrozen_parameters and self.is_lora:
            return ["unfrozen_parameters: ignored with an adapter: the base stays frozen and the adapter trains (axolotl "
                    "does not unfreeze base parameters under LoRA either); train whole modules beside the adapter "
                    "with lora_modules_to_save, or drop the adapter for full fine-tuning of the selected parameters"]
        return []

    def _loraplus_notices(self) -> list[str]:
        if self.loraplus_lr_embedding is not None and not self.loraplus_lr_ratio:
            return ["loraplus_lr_embedding: ignored: it applies with loraplus_lr_ratio, as in axolotl"]
        if self.loraplus_lr_ratio and self.weight_decay:
            return [f"weight_decay {self.weight_decay}: not applied under LoRA+ (loraplus_lr_ratio), as in axolotl, "
                    "whose PEFT optimizer groups carry no weight decay"]
        return []

    @property
    def four_bit(self) -> dict[str, Any] | None:
        """How the base is quantized (``lorafit.models.quantize_base``'s arguments), or None for a dense base."""
        return four_bit_settings(self.adapter, self.load_in_4bit, self.bnb_config_kwargs)

    # ---- construction ----
    @classmethod
    def from_dict(cls, d: Any, source: str = "<config>", config_dir: str | Path | None = None) -> TrainConfig:
        """Validate a mapping (as read from YAML). ``source`` names the file in error messages."""
        if not isinstance(d, dict):
            raise LorafitError(f"{source}: the top level must be a mapping of keys to values, got {kind(d)}")
        data, notices = screen_keys(d, source, list(cls.model_fields), list(DatasetSpec.model_fields))
        notices += _substitute_attention(data)
        try:
            cfg = cls.model_validate(data)
        except ValidationError as e:
            raise LorafitError(one_line(e, source, data, ALLOWED)) from None
        cfg._notices = (notices + cfg._four_bit_notices() + cfg._loraplus_notices() + cfg._precision_notices()
                        + cfg._unfrozen_notices() + cfg._preference_notices())
        if cfg.gradient_checkpointing == "offload":
            cfg._notices.append("gradient_checkpointing offload: each layer's saved input waits in host memory on a "
                                "GPU (transformers' offload); on a CPU-only machine it is plain checkpointing")
        cfg._source = source
        cfg._config_dir = Path(config_dir) if config_dir is not None else Path.cwd()
        bad_template = _template_name_error(cfg)
        if bad_template:
            raise LorafitError(f"{source}: {bad_template}")
        cfg._notices += _template_name_notice(cfg)
        if cfg.deepspeed:
            cfg._notices.append(cfg._read_deepspeed())
        return cfg

    def _read_deepspeed(self) -> str:
        """The ZeRO stage of ``deepspeed`` (which then picks FSDP2 or DDP), and the notice saying so."""
        if self.fsdp or self.fsdp_config or self.fsdp_version:
            raise LorafitError(f"{self.source}: deepspeed and fsdp keys are both set (axolotl refuses it too); keep "
                               "one: lorafit shards with FSDP2 either way")
        try:
            stage, where, offload = zero.read(self.deepspeed, self.resolve_path)
        except ValueError as e:
            raise LorafitError(f"{self.source}: {e}") from None
        self._zero_stage = stage
        try:  # the stage is known only now: FSDP2's rules, checked when the config validated, apply to ZeRO-3 too
            self._check_fsdp()
            self._check_fp16()
            self._check_preference()
        except ValueError as e:
            raise LorafitError(f"{self.source}: key 'deepspeed': {e}") from None
        return zero.notice(stage, where, offload)

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
        """LoRA or QLoRA: an adapter over a frozen base (dense or 4-bit)."""
        return self.adapter in ("lora", "qlora")

    @property
    def trains_embeddings(self) -> bool:
        """Whether the run trains the input embeddings and the head, so added tokens can be learnt: full
        fine-tuning, or LoRA with both in ``lora_modules_to_save``."""
        saved = set(self.lora_modules_to_save or [])
        return not self.is_lora or "lm_head" in saved and bool(saved & {"embed_tokens", "wte", "embed_in"})

    @property
    def lora_targets(self) -> list[str] | str | None:
        """``"all-linear"``, a list of module names, a regex string, or None when not training LoRA."""
        if not self.is_lora:
            return None
        if self.lora_target_linear:
            return "all-linear"
        return self.lora_target_modules or []  # empty: lora_target_parameters only

    def dtype_for(self, bf16_supported: bool, cuda: bool = False) -> str:
        """``"bfloat16"``, ``"float16"`` or ``"float32"`` on a device that does (not) support bf16: ``bf16: auto``
        is bfloat16 only where it is supported (the trainer asks CUDA, ``lorafit.models.train_dtype``; the
        estimator assumes a GPU target does). ``fp16: true`` is float16 unless ``bf16: true`` (axolotl's
        ``resolve_dtype``: bf16 wins over fp16, and fp16 over ``bf16: auto``). On a ``cuda`` device without bf16
        (a T4, a V100), ``bf16: auto`` with ``fp16`` not set is float16, as axolotl falls back there, where fp16
        can train the run (an adapter without lora_modules_to_save, no FSDP2); elsewhere float32 (on a CPU fp16
        would only add rounding: its matmuls run on fp32 copies)."""
        if self.fp16 and self.bf16 is not True:
            return "float16"
        if self.bf16 == "auto":
            if bf16_supported:
                return "bfloat16"
            fallback = cuda and "fp16" not in self.model_fields_set and self.is_lora and \
                not self.lora_modules_to_save and not self.fsdp_enabled
            return "float16" if fallback else "float32"
        return "bfloat16" if self.bf16 else "float32"

    def runtime_options(self) -> RuntimeOptions:
        """How the kernels run, from this config (environment as a fallback); resolve once per run."""
        return RuntimeOptions.resolve(self.compile_kernels, self.half_matmul, planned_tokens=self.planned_tokens,
                                      shared_prefix=self.shared_prefix)

    @property
    def planned_tokens(self) -> int | None:
        """At most how many tokens the run trains on: max_steps × micro-batch × accumulation × sequence_len
        (None without max_steps: an epoch's length depends on the data)."""
        if not self.max_steps or not isinstance(self.micro_batch_size, int) \
                or not isinstance(self.gradient_accumulation_steps, int):
            return None
        return self.max_steps * self.micro_batch_size * self.gradient_accumulation_steps * self.sequence_len

    def resolve_path(self, p: str | Path) -> Path:
        """A path written in this config: ``~`` expanded, absolute as is, relative to the config file's folder.

        The one rule for every path key (``base_model``, ``datasets``, ``output_dir``, ``tokenizer_config``,
        ``resume_from_checkpoint``, ``lora_model_dir``): the config means the same files whatever folder it is run from.
        Paths given on the command line (``--output-dir``) are relative to the working directory, as usual.
        """
        p = Path(p).expanduser()
        return p if p.is_absolute() else self.config_dir / p

    @property
    def base_model_path(self) -> str:
        """``base_model`` as a local path resolved by :meth:`resolve_path` when one is there; else as written
        (the demo model, a catalog name for the estimator, or a Hub id that loading will explain)."""
        p = self.resolve_path(self.base_model)
        return str(p) if self.base_model not in DEMO_ALIASES and p.exists() else self.base_model

    @property
    def output_path(self) -> Path:
        """``output_dir`` resolved by :meth:`resolve_path`."""
        return self.resolve_path(self.output_dir)


def _takes_numbers_only(annotation: Any) -> bool:
    """A field typed int/float (optionally None or a word such as "auto"), with no bool among its types."""
    types = typing.get_args(annotation) or (annotation,)
    return any(t in (int, float) for t in types) and bool not in types


_NUMBER_KEYS = frozenset(k for k, f in TrainConfig.model_fields.items() if _takes_numbers_only(f.annotation))


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read and validate a YAML config file. Every problem is one-line :class:`LorafitError`.

    ``overrides`` (key → value, e.g. from command-line flags; None values are ignored) replace the file's keys
    before validation, so they are checked exactly like keys written in the file."""
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
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if given and isinstance(data, dict):
        data = {**data, **given}
    try:
        return TrainConfig.from_dict(data, source=name, config_dir=path.resolve().parent)
    except LorafitError as e:
        flag = next((k for k in given if f"key '{k}'" in str(e)), None)
        if flag is None:
            raise
        raise LorafitError(f"{e} (given as --{flag.replace('_', '-')})") from None
