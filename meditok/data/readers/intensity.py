"""Mapping decoded pixels to the tokenizer's [-1, 1]: CT through a window, everything else by its scale.

CT pixels must be Hounsfield units (:func:`_require_hu`) and go through a named, (low, high) or callable
window (:func:`_window_ct`); other images are divided by their full scale, windowed by (low, high), or
normalised to their 0.5th-99.5th percentiles (:func:`_to_signed_rgb`).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import MedicalImageError
from ..windows import DEFAULT_CT_WINDOW, ct_window, linear_window, window_bounds
from .common import ROBUST_PERCENTILES, CTWindowArg, _DecodedPixels


def _require_hu(pixels: _DecodedPixels, name: str, modality) -> torch.Tensor:
    if pixels.hu is None:
        raise MedicalImageError(
            name,
            f"modality {modality!r} needs Hounsfield units, but {pixels.not_hu_reason}",
            "re-export the CT slice as a 16-bit PNG holding HU + 1024 "
            "(scripts/data/slice_volumes.py does this), or correct the modality column",
        )
    return torch.from_numpy(np.ascontiguousarray(pixels.hu, dtype=np.float32))[None]


def _window_ct(hu: torch.Tensor, window: CTWindowArg, name: str) -> torch.Tensor:
    """HU [1, H, W] -> [3, H, W] in [-1, 1]."""
    if callable(window):
        image = window(hu)
    else:
        try:
            low, high = window_bounds(DEFAULT_CT_WINDOW if window is None else window)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
        image = ct_window(hu, low, high)
    return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image


def _to_signed_rgb(pixels: _DecodedPixels, window, name: str) -> torch.Tensor:
    values = pixels.values
    if values.ndim == 3:
        if window is not None:
            raise ValueError(f"{name}: a window applies to grayscale images, this one is colour")
        image = torch.from_numpy(values.astype(np.float32) / pixels.full_scale * 2.0 - 1.0)
        return image.permute(2, 0, 1).contiguous()
    if window is not None:
        low, high = window_bounds(window)
    elif pixels.full_scale is not None:
        low, high = 0.0, pixels.full_scale
    else:  # _decode has refused non-finite values
        low, high = (float(v) for v in np.percentile(values, ROBUST_PERCENTILES))
        if not low < high:
            raise MedicalImageError(
                name,
                f"almost every pixel equals {low:g}, so a robust min-max has no range",
                "pass window=(low, high), or drop the image (quality control drops it too)",
            )
    gray = linear_window(values.astype(np.float32), low, high)  # a writable copy for torch
    if pixels.invert:
        gray = -gray
    return gray[None].expand(3, -1, -1).contiguous()
