"""Datasets: formats (alpaca / chat_template / completion / input_output), loading, masking, packing.

The trainer calls :func:`build_datasets` once, then :func:`batches` per epoch and :func:`model_inputs`
per micro-batch. Labels are aligned with input_ids (-100 = not trained) and the trained-token count of a
batch is ``(labels[:, 1:] != -100).sum()`` (``batch["num_trained_tokens"]``).
"""

from lorafit.data.batching import Batch, batches, block_causal_mask, model_inputs, pack
from lorafit.data.build import DataReport, Sample, build_datasets, split_samples, truncate
from lorafit.data.formats import IGNORE

__all__ = [
    "IGNORE",
    "Batch",
    "DataReport",
    "Sample",
    "batches",
    "block_causal_mask",
    "build_datasets",
    "model_inputs",
    "pack",
    "split_samples",
    "truncate",
]
