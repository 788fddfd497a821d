"""3D -> 2D conversion as in the paper (docs/method.md §3, appendix A.2.1).

CT: HU clipped to [-1000, 2000], every 5th slice along each of the three axes, kept by
:func:`ct_slice_rejection_reasons`, stored as 16-bit PNGs holding round(HU) + 1024.
MRI: the volume is clipped to its 0.5th-99.5th percentiles and min-max scaled to [-1, 1], then
sliced the same way, kept by :func:`mri_slice_rejection_reasons`, stored as 8-bit PNGs.
Slices start at index 0 (0, 5, 10, ...) and are oriented for display by
:func:`meditok.data.reading.volume_slice` (radiological convention).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from .quality import (
    CTSliceThresholds,
    MRISliceThresholds,
    ct_slice_rejection_reasons,
    mri_slice_rejection_reasons,
)
from .reading import ROBUST_PERCENTILES, volume_slice
from .windows import CT_PNG_HU_OFFSET

CT_HU_CLIP = (-1000.0, 2000.0)
SLICE_STEP = 5
VOLUME_MODALITIES = ("ct", "mri")


@dataclass
class VolumeSlice:
    """One candidate slice.

    pixels: [rows, cols], display-oriented; HU clipped to [-1000, 2000] for CT, [-1, 1] for MRI.
    reasons: why it is dropped; empty when kept.
    """

    axis: int
    index: int
    pixels: np.ndarray
    reasons: list[str] = field(default_factory=list)

    @property
    def kept(self) -> bool:
        return not self.reasons


def slice_positions(shape: tuple[int, ...], step: int = SLICE_STEP) -> list[tuple[int, int]]:
    """(axis, index) of every step-th slice along each of the first three axes, from index 0."""
    return [(axis, index) for axis in range(3) for index in range(0, shape[axis], step)]


def normalise_mri_volume(volume: np.ndarray) -> np.ndarray:
    """Clip to the volume's 0.5th-99.5th percentiles, min-max to [-1, 1]. float32, same shape."""
    finite = volume[np.isfinite(volume)]
    if finite.size == 0:
        raise ValueError("volume has no finite values")
    low, high = (float(v) for v in np.percentile(finite, ROBUST_PERCENTILES))
    if not low < high:
        raise ValueError(f"volume is (almost) constant at {low:g}: nothing to normalise")
    clipped = np.clip(np.nan_to_num(volume, nan=low), low, high)
    return ((clipped - low) / (high - low) * 2.0 - 1.0).astype(np.float32)


def iter_volume_slices(
    volume: np.ndarray,
    modality: str,
    step: int = SLICE_STEP,
    ct_thresholds: CTSliceThresholds = CTSliceThresholds(),
    mri_thresholds: MRISliceThresholds = MRISliceThresholds(),
) -> Iterator[VolumeSlice]:
    """Every step-th slice of a volume along each axis, with the reasons it would be dropped.

    Args:
        volume: [X, Y, Z], HU for 'ct', raw intensities for 'mri' (see read_volume).
        modality: 'ct' or 'mri'.
    """
    if volume.ndim != 3:
        raise ValueError(f"expected a 3D volume [X, Y, Z], got shape {volume.shape}")
    if modality == "ct":
        prepared = np.clip(volume, *CT_HU_CLIP).astype(np.float32)
    elif modality == "mri":
        prepared = normalise_mri_volume(volume)
    else:
        raise ValueError(f"modality must be one of {VOLUME_MODALITIES}, got {modality!r}")
    for axis, index in slice_positions(prepared.shape, step):
        pixels = volume_slice(prepared, axis, index)
        if modality == "ct":
            reasons = ct_slice_rejection_reasons(pixels, ct_thresholds)
        else:
            reasons = mri_slice_rejection_reasons(pixels, mri_thresholds)
        yield VolumeSlice(axis, index, pixels, reasons)


def ct_png_values(hu: np.ndarray) -> np.ndarray:
    """HU -> uint16 PNG values round(HU) + 1024; raises if a value does not fit."""
    stored = np.round(np.asarray(hu, dtype=np.float64)) + CT_PNG_HU_OFFSET
    if stored.min() < 0 or stored.max() > 65535:
        raise ValueError(
            f"HU range {stored.min() - CT_PNG_HU_OFFSET:g}..{stored.max() - CT_PNG_HU_OFFSET:g} "
            f"does not fit a 16-bit PNG holding HU + {CT_PNG_HU_OFFSET}; clip to {CT_HU_CLIP} first"
        )
    return stored.astype(np.uint16)


def signed_to_uint8(values: np.ndarray) -> np.ndarray:
    """[-1, 1] -> uint8 0..255 (round half to even, as numpy rounds)."""
    return np.round((np.clip(values, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def save_png(path: str | Path, pixels: np.ndarray, compress_level: int = 6) -> None:
    """Write uint8 [H, W] / [H, W, 3] or uint16 [H, W] pixels as PNG with fixed settings.

    No metadata chunks are written, so equal pixels give equal bytes (same Pillow and zlib).
    """
    if pixels.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"save_png takes uint8 or uint16 pixels, got {pixels.dtype}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(pixels)).save(
        path, format="PNG", compress_level=compress_level
    )


def save_slice_png(
    path: str | Path, volume_slice_: VolumeSlice, modality: str, compress_level: int = 6
):
    """Store a slice the way docs/method.md §3 stores it: CT as 16-bit HU + 1024, MRI as 8-bit."""
    if modality == "ct":
        save_png(path, ct_png_values(volume_slice_.pixels), compress_level)
    else:
        save_png(path, signed_to_uint8(volume_slice_.pixels), compress_level)
