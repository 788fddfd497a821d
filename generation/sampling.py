"""Choosing tokens from logits, shared by the AR and the masked-diffusion samplers: temperature, top-k,
top-p (nucleus), and the categorical draw from uniform numbers the caller supplies.

Every draw works on ``filter_logits(logits.float() / temperature, top_k, top_p)`` (:func:`apply_temperature`,
:func:`filter_logits`); temperature 0 means argmax (greedy; filtering cannot change the argmax). Two ways to
turn uniforms into a token, both exact samples of that distribution:

* :func:`choose` — inverse CDF, one uniform per row. The AR sampler (:mod:`generation.sample`) draws one
  uniform per (image, position, codebook) in a fixed order, so the KV cache changes speed, not samples.
* :func:`gumbel_choose` — Gumbel-max, one uniform per (row, token): ``argmax(logits/T − log(−log u))``. The
  diffusion sampler (:mod:`generation.diffusion.sampler`) draws every masked position of a step at once
  this way and ranks positions by the log-probability of what it drew.

Guidance (combining conditional and unconditional logits) comes before any of this: :mod:`generation.guidance`.
"""
from __future__ import annotations

from typing import Optional

import torch

from .guidance import check_cfg_scale


def check_sampling_args(temperature: float, top_k: int = 0, top_p: float = 1.0,
                        cfg_scale: Optional[float] = None) -> None:
    """Refuse values no sampler accepts: temperature < 0, top_k < 0, top_p outside (0, 1], cfg_scale < 0."""
    check_cfg_scale(cfg_scale)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits (any float dtype) → float32 logits / temperature (temperature > 0; 0 is greedy, handled by the draws)."""
    return logits.float() / temperature


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [..., V] → logits with everything outside the top-k / nucleus (top-p) set to −inf.

    top_k 0 and top_p 1 are off (the input comes back unchanged). Top-k keeps every token tied with the k-th;
    top-p keeps the smallest prefix of the sorted tokens whose probability mass reaches top_p (at least one).
    """
    if top_k and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
        remove_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def choose(logits: torch.Tensor, uniform: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0) -> torch.Tensor:
    """Sample one code per row by inverting the CDF at ``uniform`` ([B] in [0, 1)); temperature 0 = argmax.

    logits [B, V] (any float dtype; computed in float32) → codes [B] int64.
    """
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(apply_temperature(logits, temperature), top_k, top_p).softmax(-1)
    cdf = probs.cumsum(-1)
    codes = torch.searchsorted(cdf, (uniform.to(cdf) * cdf[:, -1])[:, None]).squeeze(-1)
    return codes.clamp_(max=logits.shape[-1] - 1)


def gumbel_choose(logits: torch.Tensor, uniform: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> torch.Tensor:
    """Sample one token per row by the Gumbel-max trick; temperature 0 = argmax.

    logits [..., V] (any float dtype; computed in float32), uniform [..., V] in [0, 1) (clamped away from 0)
    → ids [...] int64: ``argmax(filter_logits(logits/T) − log(−log u))``.
    """
    if temperature == 0:
        return logits.float().argmax(dim=-1)
    scaled = filter_logits(apply_temperature(logits, temperature), top_k, top_p)
    return (scaled - torch.log(-torch.log(uniform.clamp(1e-20, 1.0)))).argmax(dim=-1)
