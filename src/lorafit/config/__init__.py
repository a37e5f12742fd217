"""The YAML training config: one validated :class:`TrainConfig`, keys named as in axolotl.

An axolotl LoRA YAML runs here with at most ``base_model`` changed. Keys fall in four groups:

* **supported** keys are fields of :class:`TrainConfig` (or :class:`DatasetSpec` inside ``datasets``);
* **ignored** axolotl keys (logging integrations, attention backends, ...) are accepted; when set to
  something other than empty/false a one-line notice is collected in ``cfg.notices``;
* **unsupported** axolotl keys (``load_in_4bit``, ``deepspeed``, ``fsdp``, ...) are an error when set;
* anything else is an error with a "did you mean" hint.

Every error is a single-line :class:`~lorafit.errors.LorafitError` naming the file, the key path
(``datasets[0].type``), the value given and what is allowed.

``keys`` holds the vocabulary (names lorafit knows, axolotl keys it ignores or refuses, what each key allows)
and the screening of a mapping's keys; ``schema`` the pydantic models and :func:`load_config`; ``messages``
the one-line wording of validation errors.
"""

from lorafit.config.keys import (
    DATASET_TYPES,
    DEMO_ALIASES,
    DEMO_MODEL,
    LR_SCHEDULERS,
    OPTIMIZERS,
    SUPPORTED_OPTIMIZERS,
)
from lorafit.config.schema import DatasetSpec, TrainConfig, load_config

__all__ = ["DATASET_TYPES", "DEMO_ALIASES", "DEMO_MODEL", "LR_SCHEDULERS", "OPTIMIZERS", "SUPPORTED_OPTIMIZERS",
           "DatasetSpec", "TrainConfig", "load_config"]
