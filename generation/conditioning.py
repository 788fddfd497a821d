"""Condition embedding for class/modality-conditioned generators, with classifier-free guidance.

Labels 0..num_labels-1 are real classes (e.g. the six MedMNIST modalities of the paper's Table 3);
index ``num_labels`` is the *null* label. During training a fraction ``dropout_prob`` of the labels is
replaced by the null label, so the same network also learns the unconditional distribution; at
sampling time :func:`generation.guidance.cfg_combine` mixes the two predictions (Ho & Salimans,
"Classifier-Free Diffusion Guidance", 2022; LlamaGen uses the same recipe for its class token).
``guided_logits`` and ``check_cfg_scale`` are re-exported from :mod:`generation.guidance` under their old
names.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .guidance import cfg_combine, check_cfg_scale

# the old name of the AR sampler's combination; one formula for every sampler now lives in guidance.py
guided_logits = cfg_combine

__all__ = ["LabelEmbedding", "guided_logits", "cfg_combine", "check_cfg_scale"]


class LabelEmbedding(nn.Module):
    """labels [B] (int64 in [0, num_labels], num_labels = null) → condition tokens [B, num_tokens, dim].

    Args:
        num_labels: number of real labels.
        dim: token width.
        num_tokens: condition tokens per label (the paper's generator uses 1).
        dropout_prob: probability that :meth:`drop_labels` replaces a label by the null label (training).
    """

    def __init__(self, num_labels: int, dim: int, num_tokens: int = 1, dropout_prob: float = 0.1):
        super().__init__()
        if num_labels < 1 or num_tokens < 1:
            raise ValueError(f"LabelEmbedding needs num_labels >= 1 and num_tokens >= 1, got {num_labels}, {num_tokens}")
        if not 0.0 <= dropout_prob < 1.0:
            raise ValueError(f"class dropout probability must be in [0, 1), got {dropout_prob}")
        self.num_labels, self.dim, self.num_tokens, self.dropout_prob = num_labels, dim, num_tokens, dropout_prob
        self.table = nn.Embedding(num_labels + 1, num_tokens * dim)
        nn.init.normal_(self.table.weight, std=0.02)

    @property
    def null_label(self) -> int:
        return self.num_labels

    def check(self, labels: torch.Tensor) -> None:
        if labels.dtype not in (torch.int64, torch.int32) or labels.dim() != 1:
            raise ValueError(f"labels must be an int tensor [B], got {labels.dtype} {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.num_labels):
            bad = labels[(labels < 0) | (labels > self.num_labels)].unique().tolist()
            raise ValueError(f"label value(s) {bad} outside 0..{self.num_labels - 1} (and {self.num_labels} = null label); "
                             f"the generator was trained with {self.num_labels} labels")

    def drop_labels(self, labels: torch.Tensor, generator: Optional[torch.Generator] = None,
                    uniform: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Replace each label by the null label with probability ``dropout_prob``.

        ``uniform`` ([B] in [0, 1)) lets a caller supply the random numbers, e.g. drawn once for a global
        batch and sliced per rank, so data-parallel training drops exactly the labels a single process would.
        """
        if self.dropout_prob == 0.0:
            return labels
        if uniform is None:
            uniform = torch.rand(labels.shape, generator=generator, device="cpu")
        drop = uniform.to(labels.device) < self.dropout_prob
        return torch.where(drop, torch.full_like(labels, self.null_label), labels)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        self.check(labels)
        return self.table(labels).view(labels.shape[0], self.num_tokens, self.dim)
