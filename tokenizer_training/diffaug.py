"""Differentiable augmentation for the discriminator (Zhao et al. 2020, "DiffAugment"), on [-1, 1] images.

docs/method.md §2: colour, translation and cutout (ratio 0.2) on both real and fake inputs of the discriminator;
the balanced-consistency regularisation (BCR) uses the same augmentation as its "strong" augmentation.

Operations, each drawn independently per sample:

- ``color``: brightness ``x + (u - 0.5)``; saturation ``(x - mean_c) · 2u + mean_c`` (mean over channels);
  contrast ``(x - mean) · (u + 0.5) + mean`` (mean over channels and pixels); u ~ U[0, 1).
- ``translation``: shift by an integer in [-r·H, r·H] × [-r·W, r·W] pixels (r = 1/8), filling with 0.
- ``cutout``: zero a (ratio·H) × (ratio·W) box centred at a uniformly drawn pixel (clipped at the border).

The filling value 0 is mid-grey in [-1, 1], as in DiffAugment. Outputs are not clamped: colour jitter can leave
[-1, 1] (brightness alone reaches ±1.5), which the discriminator sees as it did in the original method.

Reusing the same random draw for several batches (e.g. real and fake, or x and its BCR copy)::

    params = sample_diff_augment(batch_size, height, width, device=x.device)   # DiffAugmentParams
    real_aug = apply_diff_augment(real, params)
    fake_aug = apply_diff_augment(fake, params)       # same brightness/shift/box per sample index

``diff_augment(x, ...)`` samples and applies in one call; pass ``params=`` to reuse a draw, or
``return_params=True`` to get it back. Everything is differentiable w.r.t. ``x`` (the generator's
adversarial loss back-propagates through it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

DEFAULT_POLICY = "color,translation,cutout"
TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.2
_KNOWN_OPERATIONS = ("color", "translation", "cutout")


@dataclass
class DiffAugmentParams:
    """One random draw of the augmentation, for a batch of ``batch_size`` images of ``height`` × ``width``.

    Tensors are per sample (None when the operation is not in the policy): ``brightness``, ``saturation``,
    ``contrast`` [B] (already mapped to the added offset / multipliers), ``shift`` [B, 2] int64 (dy, dx),
    ``cutout_start`` [B, 2] int64 (top, left of the box, may be negative) with ``cutout_size`` (h, w).
    """

    batch_size: int
    height: int
    width: int
    brightness: Optional[torch.Tensor] = None
    saturation: Optional[torch.Tensor] = None
    contrast: Optional[torch.Tensor] = None
    shift: Optional[torch.Tensor] = None
    cutout_start: Optional[torch.Tensor] = None
    cutout_size: Tuple[int, int] = (0, 0)


def _parse_policy(policy: str) -> Tuple[str, ...]:
    operations = tuple(p.strip() for p in policy.split(",") if p.strip())
    unknown = [p for p in operations if p not in _KNOWN_OPERATIONS]
    if unknown:
        raise ValueError(f"unknown DiffAugment operation(s) {unknown} in policy {policy!r}; "
                         f"known: {', '.join(_KNOWN_OPERATIONS)}")
    return operations


def sample_diff_augment(batch_size: int, height: int, width: int, policy: str = DEFAULT_POLICY,
                        cutout: float = CUTOUT_RATIO, translation: float = TRANSLATION_RATIO,
                        generator: Optional[torch.Generator] = None,
                        device: Union[str, torch.device] = "cpu") -> DiffAugmentParams:
    """Draw the random parameters once: on ``generator``'s device when one is given (then moved to ``device``),
    else with the default generator of ``device`` itself — on a GPU, a draw on the CPU followed by a copy
    would make the host wait for the GPU (a pageable host→device copy synchronises the stream)."""
    operations = _parse_policy(policy)
    gen_device = generator.device if generator is not None else torch.device(device)

    def uniform(*shape):
        return torch.rand(*shape, generator=generator, device=gen_device).to(device)

    params = DiffAugmentParams(batch_size, height, width)
    if "color" in operations:
        params.brightness = uniform(batch_size) - 0.5
        params.saturation = uniform(batch_size) * 2
        params.contrast = uniform(batch_size) + 0.5
    if "translation" in operations:
        max_dy, max_dx = int(height * translation + 0.5), int(width * translation + 0.5)
        dy = torch.randint(-max_dy, max_dy + 1, (batch_size,), generator=generator, device=gen_device)
        dx = torch.randint(-max_dx, max_dx + 1, (batch_size,), generator=generator, device=gen_device)
        params.shift = torch.stack([dy, dx], dim=1).to(device)
    if "cutout" in operations:
        box_h, box_w = int(height * cutout + 0.5), int(width * cutout + 0.5)
        centre_y = torch.randint(0, height, (batch_size,), generator=generator, device=gen_device)
        centre_x = torch.randint(0, width, (batch_size,), generator=generator, device=gen_device)
        params.cutout_start = torch.stack([centre_y - box_h // 2, centre_x - box_w // 2], dim=1).to(device)
        params.cutout_size = (box_h, box_w)
    return params


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.dtype).view(-1, 1, 1, 1)


def _translate(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Shift each image by its (dy, dx), filling uncovered pixels with 0 — by gathering from a 1-pixel
    zero-padded copy, so the result stays differentiable and needs no loop over the batch."""
    batch, _, height, width = x.shape
    padded = F.pad(x, [1, 1, 1, 1])  # [B, C, H+2, W+2]; index 0 and H+1 are the zero border
    rows = torch.arange(height, device=x.device).view(1, height) - shift[:, 0:1] + 1  # source row in `padded`
    cols = torch.arange(width, device=x.device).view(1, width) - shift[:, 1:2] + 1
    rows = rows.clamp(0, height + 1)  # anything shifted in from outside reads the zero border
    cols = cols.clamp(0, width + 1)
    batch_index = torch.arange(batch, device=x.device).view(batch, 1, 1)
    gathered = padded.permute(0, 2, 3, 1)[batch_index, rows.view(batch, height, 1), cols.view(batch, 1, width)]
    return gathered.permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor, start: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    _, _, height, width = x.shape
    rows = torch.arange(height, device=x.device).view(1, height, 1)
    cols = torch.arange(width, device=x.device).view(1, 1, width)
    top, left = start[:, 0].view(-1, 1, 1), start[:, 1].view(-1, 1, 1)
    inside = (rows >= top) & (rows < top + size[0]) & (cols >= left) & (cols < left + size[1])  # [B, H, W]
    return x.masked_fill(inside.unsqueeze(1), 0.0)


def apply_diff_augment(x: torch.Tensor, params: DiffAugmentParams) -> torch.Tensor:
    """Apply a drawn augmentation: x [B, 3, H, W] (nominally [-1, 1]) → same shape, differentiable in x."""
    if x.ndim != 4 or (x.shape[0], x.shape[2], x.shape[3]) != (params.batch_size, params.height, params.width):
        raise ValueError(f"DiffAugmentParams were drawn for [B={params.batch_size}, H={params.height}, "
                         f"W={params.width}] but the images have shape {tuple(x.shape)}")
    if params.brightness is not None:
        x = x + _per_sample(params.brightness, x)
        mean_over_channels = x.mean(dim=1, keepdim=True)
        x = (x - mean_over_channels) * _per_sample(params.saturation, x) + mean_over_channels
        mean_over_image = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean_over_image) * _per_sample(params.contrast, x) + mean_over_image
    if params.shift is not None:
        x = _translate(x, params.shift)
    if params.cutout_start is not None:
        x = _cutout(x, params.cutout_start, params.cutout_size)
    return x


def diff_augment(x: torch.Tensor, policy: str = DEFAULT_POLICY, cutout: float = CUTOUT_RATIO,
                 generator: Optional[torch.Generator] = None, translation: float = TRANSLATION_RATIO,
                 params: Optional[DiffAugmentParams] = None, return_params: bool = False):
    """Augment x [B, 3, H, W] in [-1, 1] → same shape (see module docstring).

    ``params`` reuses an earlier draw (``policy``/``cutout``/``translation``/``generator`` are then ignored);
    ``return_params=True`` returns ``(augmented, params)`` so the same draw can be applied to another batch.
    An empty policy returns x unchanged.
    """
    if params is None:
        if not _parse_policy(policy):
            return (x, DiffAugmentParams(x.shape[0], x.shape[2], x.shape[3])) if return_params else x
        params = sample_diff_augment(x.shape[0], x.shape[2], x.shape[3], policy=policy, cutout=cutout,
                                     translation=translation, generator=generator, device=x.device)
    augmented = apply_diff_augment(x, params)
    return (augmented, params) if return_params else augmented


__all__ = ["DiffAugmentParams", "sample_diff_augment", "apply_diff_augment", "diff_augment", "DEFAULT_POLICY"]
