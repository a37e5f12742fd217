"""lorafit: LoRA fine-tuning for Hugging Face causal LMs when GPU memory is the limit."""

from lorafit.errors import LorafitError

__version__ = "0.1.0"
__all__ = ["LorafitError", "__version__"]
