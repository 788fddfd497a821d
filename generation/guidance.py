"""Classifier-free guidance (CFG) for every generator over MedITok ids: one combination, one meaning of "off".

Both samplers — the autoregressive one (:func:`generation.sample.generate`) and the masked-diffusion one
(:func:`generation.diffusion.sampler.sample`) — predict logits twice, once with the real condition (``c``)
and once with the null label (and, for diffusion, the conditioning part masked; ``u``), and combine them
on the logits (Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022; LlamaGen does the same for its
class token)::

    guided = u + s · (c − u)

``s = 0`` gives the unconditional prediction, ``s > 1`` strengthens the conditioning, negative scales are
refused (:func:`check_cfg_scale`).

**Off.** ``scale=None`` and ``scale=1.0`` both mean *no guidance*: the sampler runs the conditional pass
only (no unconditional forward, half the compute) and :func:`cfg_combine` returns the conditional logits
unchanged. Why both: ``s = 1`` is the identity of the formula (``u + 1·(c − u) = c``), so a second pass at
``s = 1`` would only cost time and add float rounding; and each spelling is already in use — the AR
sampler and ``python -m generation.sample --cfg-scale`` default to ``None`` ("not set", the paper's
setting), the diffusion sampler and ``python -m generation.diffusion.sample --cfg-scale`` default to
``1.0``. Accepting both in both samplers keeps every existing CLI flag and config meaning what it meant.
Test with :func:`guidance_on`, never with ``scale is None`` or ``scale == 1``.
"""
from __future__ import annotations

from typing import Optional

import torch

#: the values of ``cfg_scale`` that mean "no guidance" (one forward pass, conditional logits unchanged)
OFF_SCALES = (None, 1.0)


def check_cfg_scale(scale: Optional[float]) -> None:
    """Refuse a negative (or NaN) guidance scale; ``None`` is allowed (off)."""
    if scale is not None and not scale >= 0:
        raise ValueError(f"CFG scale must be >= 0 (unset or 1 = no guidance, 0 = unconditional, "
                         f">1 = stronger conditioning), got {scale}")


def guidance_on(scale: Optional[float]) -> bool:
    """Whether ``scale`` asks for guidance, i.e. for the unconditional pass: False for ``None`` and ``1.0``."""
    check_cfg_scale(scale)
    return scale is not None and scale != 1.0


def cfg_combine(conditional: torch.Tensor, unconditional: Optional[torch.Tensor],
                scale: Optional[float]) -> torch.Tensor:
    """Classifier-free guidance on logits: ``unconditional + scale · (conditional − unconditional)``.

    When guidance is off (``scale`` None or 1.0) the conditional logits come back unchanged (the same
    tensor) and ``unconditional`` is not read, so a caller that skipped the unconditional pass may pass None.
    """
    if not guidance_on(scale):
        return conditional
    if unconditional is None:
        raise ValueError(f"CFG scale {scale} needs the unconditional logits")
    return unconditional + scale * (conditional - unconditional)
