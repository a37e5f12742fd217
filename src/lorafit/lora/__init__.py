"""The LoRA engine: config, the layer and its variants, shared-input groups, model surgery, PEFT-format files."""

from lorafit.kernels.lora_branch import LoraLinearFunction
from lorafit.lora.config import ALL_LINEAR, LoraConfig
from lorafit.lora.inject import (
    ParameterCount,
    apply_lora,
    count_parameters,
    disable_adapter,
    find_targets,
    lora_layers,
    merge,
    merge_and_unload,
    named_lora_layers,
    unload,
    unmerge,
)
from lorafit.lora.io import (
    adapter_state_dict,
    load_adapter,
    read_adapter_config,
    read_adapter_weights,
    save_adapter,
)
from lorafit.lora.layer import LoraLinear
from lorafit.lora.variants import LoraVariant

__all__ = [
    "ALL_LINEAR",
    "LoraConfig",
    "LoraLinear",
    "LoraLinearFunction",
    "LoraVariant",
    "ParameterCount",
    "adapter_state_dict",
    "apply_lora",
    "count_parameters",
    "disable_adapter",
    "find_targets",
    "load_adapter",
    "lora_layers",
    "merge",
    "merge_and_unload",
    "named_lora_layers",
    "read_adapter_config",
    "read_adapter_weights",
    "save_adapter",
    "unload",
    "unmerge",
]
