"""The public reading functions and the dispatch from a detected format to its reader.

:func:`read_image`, :func:`read_ct_hu` and :func:`read_volume` (documented in :mod:`meditok.data.reading`,
the module to import them from) detect the format (:mod:`.detect`), decode with that format's reader
(:mod:`.pillow`, :mod:`.dicom`, :mod:`.nifti`), refuse non-finite values and map to [-1, 1] (:mod:`.intensity`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import MedicalImageError
from .common import CTWindowArg, PathLike, _DecodedPixels, _require_finite, normalise_modality
from .detect import _detect_format, _read_head
from .dicom import _decode_dicom, _dicom_decode, _dicom_modality_lut, _read_dicom_dataset, _read_dicom_series
from .intensity import _require_hu, _to_signed_rgb, _window_ct
from .nifti import _decode_nifti, _load_nifti_volume
from .pillow import _decode_pillow


def read_image(
    path: PathLike,
    modality: str | None = None,
    window: CTWindowArg = None,
    *,
    frame: int | None = None,
    slice_index: int | None = None,
    slice_axis: int = 2,
    data: bytes | None = None,
) -> torch.Tensor:
    """Read a medical image as the tokenizer's input.

    Args:
        path: the image file. With `data`, only a name used in error messages.
        modality: the metadata label ('ct', 'mri', 'fundus', ...). Only 'ct' changes how pixels
            are read (as HU, through a window); None lets a DICOM's own Modality decide.
        window: for CT, a name from ``CT_WINDOWS``, (low, high) in HU, or a callable mapping HU
            [1, H, W] to [3, H, W] in [-1, 1] (e.g. ``RandomCTWindow()``); default 'common'.
            For other grayscale data, (low, high) in stored units (after the DICOM modality LUT).
        frame: multi-frame DICOM / multi-page TIFF frame, or 4D NIfTI volume; default: the
            middle frame of a multi-frame DICOM, the first page or volume otherwise.
        slice_index, slice_axis: NIfTI slice along an axis of the RAS+ canonical volume
            (0 sagittal, 1 coronal, 2 axial); default: the middle axial slice.
        data: the file's bytes, when it does not live on disk (e.g. a webdataset shard).

    Returns:
        float32 tensor [3, H, W] in [-1, 1].

    Raises:
        MedicalImageError: the file is missing, empty, truncated, not an image, too large for
            Pillow's decompression-bomb limit, a DICOM the installed decoders cannot decode, holds
            NaN/Inf values in the image read, or is not readable as CT for a `ct` row; the message
            names the file, the reason and the fix.
    """
    name = str(path)
    is_ct = normalise_modality(modality) == "ct"
    pixels = _decode(path, data, frame=frame, slice_index=slice_index, slice_axis=slice_axis)
    if modality is None and pixels.dicom_modality == "CT":
        is_ct = True
    if is_ct:
        return _window_ct(_require_hu(pixels, name, modality), window, name)
    if callable(window) or isinstance(window, str):
        raise ValueError(
            f"{name}: window {window!r} is a CT window, but the image is not CT (modality "
            f"{modality!r}); pass (low, high) in stored units, or modality='ct'"
        )
    return _to_signed_rgb(pixels, window, name)


def read_ct_hu(
    path: PathLike,
    *,
    frame: int | None = None,
    slice_index: int | None = None,
    slice_axis: int = 2,
    data: bytes | None = None,
) -> torch.Tensor:
    """Read a CT image as Hounsfield units, before any window.

    Accepts a 16-bit PNG holding HU + 1024, a CT DICOM (rescale slope/intercept applied) or a
    NIfTI volume holding HU; options as in :func:`read_image`.

    Returns:
        float32 tensor [1, H, W] in HU (air about -1000, water 0).

    Raises:
        MedicalImageError: unreadable, holds NaN/Inf values, or not a CT image (e.g. an 8-bit PNG,
            an MR DICOM).
    """
    pixels = _decode(path, data, frame=frame, slice_index=slice_index, slice_axis=slice_axis)
    return _require_hu(pixels, str(path), "ct")


def read_volume(path: PathLike) -> np.ndarray:
    """Read a 3D volume: a NIfTI file, a folder holding one DICOM series, or a multi-frame DICOM.

    NIfTI volumes and DICOM series (ordered along the slice normal from ImagePositionPatient) are
    returned in RAS+ canonical orientation, so axis 0/1/2 is sagittal/coronal/axial. A multi-frame
    DICOM file is stacked in stored frame order, laid out so that :func:`volume_slice` along
    axis 2 gives each frame as stored; it is not reoriented.

    Args:
        path: .nii / .nii.gz file, DICOM series folder, or multi-frame DICOM file.

    Returns:
        float32 array [X, Y, Z] (a 4D NIfTI gives its first volume): NIfTI values with the
        header's scaling, DICOM values after the modality LUT (rescale slope/intercept, so HU
        for CT). Every value is finite.

    Raises:
        MedicalImageError: unreadable, not a volume, or any voxel is NaN/Inf (the message gives
            the count).
    """
    return _require_finite(_read_volume_values(path), str(path), "voxel")


def _read_volume_values(path: PathLike) -> np.ndarray:
    name = str(path)
    path = Path(path)
    if path.is_dir():
        return _read_dicom_series(path)
    head = _read_head(path, None)
    kind = _detect_format(head, name)
    if kind == "nifti":
        volume = _load_nifti_volume(path, None)
        if volume.ndim == 4:
            volume = volume[..., 0]
        if volume.ndim != 3:
            raise MedicalImageError(
                name,
                f"expected a 3D volume, got shape {volume.shape}",
                "pass a 3D (or 4D) NIfTI volume",
            )
        return volume
    if kind == "dicom":
        ds = _read_dicom_dataset(path, None, name)
        frames = _dicom_decode(ds, None, name)
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        if n_frames < 2 or int(ds.get("SamplesPerPixel", 1)) != 1:
            raise MedicalImageError(
                name,
                f"a single-frame or colour DICOM is not a volume ({n_frames} frame(s))",
                "pass a folder holding the whole series, or a multi-frame grayscale DICOM",
            )
        volume = np.stack([_dicom_modality_lut(f, ds, i) for i, f in enumerate(frames)])
        # [frames, rows, cols] -> [X, Y, frames] with X, Y reversed, the inverse of volume_slice's
        # display mapping, so that axial slice k is frame k as stored.
        return np.ascontiguousarray(volume[:, ::-1, ::-1].transpose(2, 1, 0), dtype=np.float32)
    raise MedicalImageError(
        name,
        f"not a volume format (detected {kind})",
        "pass a .nii/.nii.gz file, a DICOM series folder or a multi-frame DICOM",
    )


def _decode(path, data, *, frame, slice_index, slice_axis) -> _DecodedPixels:
    name = str(path)
    head = _read_head(path, data)
    kind = _detect_format(head, name)
    if kind == "dicom":
        pixels = _decode_dicom(path, data, name, frame)
    elif kind == "nifti":
        pixels = _decode_nifti(path, data, name, frame, slice_index, slice_axis)
    else:
        pixels = _decode_pillow(path, data, name, frame)
    _require_finite(pixels.values, name, "pixel")
    if pixels.hu is not None and pixels.hu is not pixels.values:
        _require_finite(pixels.hu, name, "pixel")
    return pixels
