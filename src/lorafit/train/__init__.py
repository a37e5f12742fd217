"""Training: the recipe (:mod:`lorafit.train.recipe`) and the pieces it reads top to bottom.

``setup`` (seeds, the adapter, what training does to a model), ``step`` (one optimizer step, the eval loss),
``loss`` (the chunked causal-LM loss of a transformers model), ``optim``, ``checkpoint``, ``metrics``,
``progress``, ``stop``.
"""

from lorafit.train.recipe import Recipe, TrainingDiverged, TrainResult, train
from lorafit.train.setup import lora_config_from, make_trainable, prepare_model, seed_everything
from lorafit.train.step import evaluate, train_step

__all__ = [
    "Recipe",
    "TrainResult",
    "TrainingDiverged",
    "evaluate",
    "lora_config_from",
    "make_trainable",
    "prepare_model",
    "seed_everything",
    "train",
    "train_step",
]
