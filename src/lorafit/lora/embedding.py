"""LoraEmbedding: a frozen ``nn.Embedding`` (the token embeddings) plus a trainable low-rank update, as PEFT's
``lora.Embedding``.

The update of the (vocab × d) table is ``s · (B A)ᵀ`` with ``A`` (r × vocab) and ``B`` (d × r); it is applied
as a lookup, never as a dense table: ``h = E[ids] + s · A[:, ids]ᵀ Bᵀ`` (``F.embedding(ids, Aᵀ) @ Bᵀ · s``).
Initialisation is PEFT's (after loralib): **A zeros, B normal(0, 1)** — the reverse of a linear layer's — so a
fresh adapter changes nothing. PEFT applies no dropout to an embedding's update (it has no input features to
drop), and neither does this layer. A base that scales its lookups (Gemma's ``embed_scale``) scales the update
by the same factor, as PEFT does. File keys are PEFT's: ``<path>.lora_embedding_A`` / ``<path>.lora_embedding_B``
(parameters, no ``.weight``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoraEmbedding(nn.Module):
    """``base_layer`` (an ``nn.Embedding``, kept under PEFT's attribute name) plus ``s · (B A)ᵀ``.

    Args:
        base_layer: the embedding being adapted.
        r, alpha, use_rslora: rank and scale (``alpha / r``, or ``alpha / √r``), as for linear layers.
        adapter_dtype: dtype of A and B (fp32 by default, also under a bf16 base).
    """

    fan_in_fan_out = False

    def __init__(self, base_layer: nn.Embedding, r: int, alpha: float, use_rslora: bool = False,
                 adapter_dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"LoraEmbedding wraps nn.Embedding, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.dropout_p = 0.0
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        device = base_layer.weight.device
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, self.in_features, device=device, dtype=adapter_dtype))
        self.lora_embedding_B = nn.Parameter(torch.empty(self.out_features, r, device=device, dtype=adapter_dtype))
        self.merged = False
        self.disabled = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # PEFT's reset_lora_parameters for embeddings (loralib's Embedding): A zeros, B the default of nn.Embedding
        nn.init.zeros_(self.lora_embedding_A)
        nn.init.normal_(self.lora_embedding_B)

    @property
    def weight(self) -> torch.Tensor:
        """The base table, as PEFT's layers expose it (callers read ``get_input_embeddings().weight``)."""
        return self.base_layer.weight

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors an adapter file holds, by name under the layer's path (PEFT's names)."""
        return {"lora_embedding_A": self.lora_embedding_A, "lora_embedding_B": self.lora_embedding_B}

    def _embed_scale(self) -> torch.Tensor | float | None:
        scale = getattr(self.base_layer, "embed_scale", None)
        return scale if isinstance(scale, int | float) or (torch.is_tensor(scale) and scale.numel() == 1) else None

    def delta_weight(self) -> torch.Tensor:
        """What merging adds to the table, in fp32, shaped (vocab × d): ``s · (B A)ᵀ``."""
        return (self.lora_embedding_B.float() @ self.lora_embedding_A.float()).t() * self.scaling

    @torch.no_grad()
    def merge(self, safe: bool = False) -> None:
        if self.merged:
            return
        w = self.base_layer.weight
        merged = w.float() + self.delta_weight()
        if safe and not torch.isfinite(merged).all():
            raise ValueError("merging would write NaN/inf into the embedding table")
        w.copy_(merged.to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = self.base_layer.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(ids)
        if self.merged or self.disabled:
            return result
        base = self.base_layer
        after_a = F.embedding(ids, self.lora_embedding_A.t(), padding_idx=base.padding_idx, max_norm=base.max_norm,
                              norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq,
                              sparse=base.sparse)
        update = (after_a @ self.lora_embedding_B.t()) * self.scaling
        scale = self._embed_scale()
        if scale is not None:
            update = update * (scale.to(update.dtype) if torch.is_tensor(scale) else scale)
        return (result + update).to(result.dtype)

    def extra_repr(self) -> str:
        return (f"vocab={self.in_features}, dim={self.out_features}, r={self.r}, alpha={self.alpha}, "
                f"scaling={self.scaling:.4g}, merged={self.merged}")
