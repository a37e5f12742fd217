"""LoraConfig: the knobs of a LoRA adapter, validated, and its PEFT ``adapter_config.json`` form."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from lorafit.errors import LorafitError
from lorafit.targets import ALL_LINEAR, pattern_value

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = ("kaiming", "gaussian", "pissa")


@dataclass
class LoraConfig:
    """What to adapt and how.

    ``target_modules``: a list of module names (a name matches a module whose dotted path equals it or ends
    with ``"." + name``, as in PEFT), a regex string matched against the full dotted path, or ``"all-linear"``
    (every Linear/Conv1D layer except the output head).
    ``rank_pattern`` / ``alpha_pattern`` map a name or regex (matched at the end of the module path, as in
    PEFT) to a rank / alpha overriding ``r`` / ``alpha`` for those modules.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str = ALL_LINEAR
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False  # DoRA (Liu et al. 2024): a trained magnitude per output row (lora.variants)
    init: str = "kaiming"
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    # PEFT's target_parameters: parameters (MoE experts' 3-D tensors) adapted in place (lorafit.lora.parameter)
    target_parameters: list[str] | None = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        _check_rank("r", self.r)
        for key, value in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{key!r}]", value)
        if not isinstance(self.alpha, int | float) or isinstance(self.alpha, bool) or self.alpha <= 0:
            raise LorafitError(f"lora alpha: got {self.alpha!r}, must be a number > 0 (commonly 16)")
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise LorafitError(f"lora dropout: got {self.dropout!r}, must be in [0, 1) (commonly 0.05)")
        if self.bias not in BIAS_MODES:
            raise LorafitError(f"lora bias: got {self.bias!r}, allowed: {', '.join(BIAS_MODES)}")
        if self.init not in INIT_MODES:
            raise LorafitError(f"lora init: got {self.init!r}, allowed: {', '.join(INIT_MODES)}")
        if self.use_dora and self.init == "pissa":
            # PiSSA adapters are saved converted to plain LoRA (lora.io), which has no form for DoRA's magnitude
            raise LorafitError("lora init pissa cannot be combined with DoRA (use_dora); use kaiming or gaussian")
        if isinstance(self.target_modules, str):
            if self.target_modules != ALL_LINEAR:
                try:
                    re.compile(self.target_modules)
                except re.error as e:
                    raise LorafitError(f"lora target_modules: {self.target_modules!r} is not a valid regex: {e}") from None
        elif not (self.target_modules or self.target_parameters) or not all(
                isinstance(t, str) and t for t in self.target_modules):
            raise LorafitError(
                f"lora target_modules: got {self.target_modules!r}; give module names like "
                "['q_proj', 'v_proj'], a regex, or 'all-linear'"
            )
        if self.target_parameters is not None:
            self._check_target_parameters()
        if self.layers_to_transform is not None and not all(
            isinstance(i, int) and i >= 0 for i in self.layers_to_transform
        ):
            raise LorafitError(f"lora layers_to_transform: got {self.layers_to_transform!r}, must be layer indices >= 0")

    def _check_target_parameters(self) -> None:
        """PEFT's rules for parameter targets: names, no dropout (it cannot act on a weight update), no DoRA."""
        if not self.target_parameters or not all(isinstance(t, str) and t for t in self.target_parameters):
            raise LorafitError(f"lora target_parameters: got {self.target_parameters!r}; give parameter names like "
                               "['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']")
        if self.dropout:
            raise LorafitError(f"lora dropout {self.dropout} with target_parameters: a parameter's update cannot "
                               "take dropout (PEFT refuses it too); set lora_dropout: 0")
        if self.use_dora or self.init == "pissa":
            raise LorafitError("target_parameters cannot be combined with DoRA or PiSSA (PEFT's rule); use plain LoRA")

    def rank_for(self, module_path: str) -> int:
        return int(pattern_value(self.rank_pattern, module_path, self.r))

    def alpha_for(self, module_path: str) -> float:
        return float(pattern_value(self.alpha_pattern, module_path, self.alpha))

    def scaling_for(self, module_path: str) -> float:
        r, alpha = self.rank_for(module_path), self.alpha_for(module_path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # --- PEFT's adapter_config.json -------------------------------------------------------------------
    def to_peft_dict(self, target_names: list[str], base_model: str | None = None) -> dict[str, Any]:
        """The ``adapter_config.json`` PEFT writes for the same adapter (fields PEFT 0.13+ reads)."""
        targets = self.target_modules if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR else sorted(target_names)
        if not targets and self.target_parameters:
            targets = None  # parameters only: PEFT writes no module targets
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": targets,
            "bias": self.bias,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "init_lora_weights": {"kaiming": True, "gaussian": "gaussian", "pissa": "pissa"}[self.init],
            "modules_to_save": self.modules_to_save,
            "layers_to_transform": self.layers_to_transform,
            "layers_pattern": None,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "target_parameters": sorted(self.target_parameters) if self.target_parameters else None,
            "fan_in_fan_out": False,
            "inference_mode": True,
            "revision": None,
        }

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any], source: str = "adapter_config.json") -> LoraConfig:
        if d.get("peft_type", "LORA") != "LORA":
            raise LorafitError(f"{source}: peft_type {d.get('peft_type')!r} is not LORA; lorafit loads LoRA adapters only")
        if d.get("ensure_weight_tying"):
            # PEFT then ties the head's adapter (or trained copy) to the embeddings'; lorafit adapts them apart
            raise LorafitError(f"{source}: ensure_weight_tying is true (PEFT ties the head's adapter to the "
                               "embeddings'); lorafit does not support tied adapters yet")
        init = d.get("init_lora_weights", True)
        params = d.get("target_parameters") or None
        targets = d.get("target_modules") or ([] if params else ALL_LINEAR)
        if isinstance(targets, set | tuple):
            targets = list(targets)
        try:
            return cls(
                r=d.get("r", 8),
                alpha=d.get("lora_alpha", 8),
                dropout=d.get("lora_dropout", 0.0),
                target_modules=targets,
                bias=d.get("bias", "none"),
                use_rslora=bool(d.get("use_rslora", False)),
                use_dora=bool(d.get("use_dora", False)),
                init="gaussian" if init == "gaussian" else "kaiming",
                modules_to_save=d.get("modules_to_save"),
                layers_to_transform=_as_list(d.get("layers_to_transform")),
                rank_pattern=d.get("rank_pattern") or {},
                alpha_pattern=d.get("alpha_pattern") or {},
                target_parameters=list(params) if params else None,
            )
        except LorafitError as e:
            raise LorafitError(f"{source}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_list(value):
    return [value] if isinstance(value, int) else value


def _check_rank(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise LorafitError(f"lora {name}: got {value!r}, must be an integer > 0 (8 for easy tasks, 16-64 for harder)")
