"""What every reader shares: type aliases, format names, constants and the decoded-pixels record.

:class:`_DecodedPixels` is what each format reader (:mod:`.pillow`, :mod:`.dicom`, :mod:`.nifti`) returns
and what :mod:`.intensity` maps to [-1, 1]; :func:`_require_finite` is the NaN/Inf refusal applied to every
path; :func:`volume_slice` is the radiological display convention for slices of a RAS+ volume.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import numpy as np
import torch

from ..errors import MedicalImageError

PathLike = Union[str, Path]
# A CT window: a name from CT_WINDOWS, (low, high) in HU, or a callable HU [1, H, W] -> [3, H, W].
CTWindowArg = Union[str, tuple[float, float], Callable[[torch.Tensor], torch.Tensor], None]

SUPPORTED_FORMATS = (
    "PNG, JPEG, TIFF, BMP, GIF (Pillow), DICOM (pydicom), NIfTI-1/2 .nii/.nii.gz (nibabel)"
)
# The paper's MRI normalisation (docs/method.md §3), also used for any non-CT data without a fixed full scale.
ROBUST_PERCENTILES = (0.5, 99.5)
# Axes of a RAS+ canonical volume, named for file names and CSV columns.
AXIS_NAMES = ("sagittal", "coronal", "axial")

_CORRUPT_FIX = "the file is probably truncated or corrupt; copy or export it again"


def normalise_modality(modality: str | None) -> str | None:
    """Lower-case, stripped modality label ('CT ' -> 'ct'); None or '' -> None."""
    if modality is None:
        return None
    modality = str(modality).strip().lower()
    return modality or None


@dataclass
class _DecodedPixels:
    """Pixels as decoded, before mapping to [-1, 1].

    values: [H, W] grayscale or [H, W, 3] RGB, numeric.
    full_scale: the value that means "maximum brightness" for fixed-scale data (255, 65535), or
        None when the data has no fixed scale (MR/NIfTI/rescaled DICOM) and needs a window.
    invert: DICOM MONOCHROME1.
    hu: Hounsfield units [H, W] float when the pixels can be read as CT, else None.
    not_hu_reason: why they cannot (used in the error for a `ct` row).
    dicom_modality: the DICOM Modality attribute, if any.
    """

    values: np.ndarray
    full_scale: float | None
    invert: bool = False
    hu: np.ndarray | None = None
    not_hu_reason: str = ""
    dicom_modality: str | None = None


def _require_finite(values: np.ndarray, name: str, unit: str) -> np.ndarray:
    """`values` unchanged if every value is finite, else MedicalImageError with the count."""
    if values.dtype.kind not in "fc":  # integer data cannot hold NaN or Inf
        return values
    finite = np.isfinite(values)
    if finite.all():
        return values
    bad = values[~finite]
    n_nan = int(np.isnan(bad).sum())
    n_inf = bad.size - n_nan
    raise MedicalImageError(
        name,
        f"{bad.size} of {values.size} {unit} values are not finite ({n_nan} NaN, {n_inf} +/-Inf)",
        "replace them in the file (e.g. with the background value: -1024 HU for CT, 0 for MR) "
        "and save it again, or leave the file out; no value is guessed for them, and "
        "scripts/data/quality_control.py drops such files",
    )


def volume_slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """One 2D slice of a RAS+ volume [X, Y, Z], in the radiological display convention.

    Returns:
        array [rows, cols]: axis 2 (axial) gives [Y, X] with anterior up and the patient's right
        on the left; axis 1 (coronal) [Z, X] and axis 0 (sagittal) [Z, Y] with superior up
        (sagittal: anterior on the left).
    """
    plane = np.take(volume, index, axis=axis)
    # Both in-plane RAS axes point the "wrong" way for display (+X is the patient's right, which
    # goes on the image's left; +Y/+Z point up, while row indices grow downwards).
    return np.ascontiguousarray(plane[::-1, ::-1].T)
