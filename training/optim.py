"""AdamW with the parameter grouping every trainer uses: weight decay on matrices (≥ 2-d: linear and conv
weights, embeddings), none on vectors and scalars (norm gains, biases, a logit scale), as LlamaGen, MAE and the
released MedITok trainer do; frozen parameters are left out."""
from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

import torch


def decay_groups(parameters: Iterable[torch.nn.Parameter], weight_decay: float) -> List[Dict]:
    """[{matrices, weight_decay}, {vectors and scalars, 0}] of the parameters that require gradients."""
    trainable = [p for p in parameters if p.requires_grad]
    return [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]


def adamw(parameters: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
          betas: Tuple[float, float] = (0.9, 0.95), **kwargs) -> torch.optim.AdamW:
    """AdamW over :func:`decay_groups` (``kwargs``: eps, fused, ...)."""
    return torch.optim.AdamW(decay_groups(parameters, weight_decay), lr=lr, betas=tuple(betas), **kwargs)
