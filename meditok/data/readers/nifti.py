"""The NIfTI-1/2 reader (nibabel, imported on first use): .nii and .nii.gz, from disk or from bytes.

Volumes are brought to RAS+ canonical orientation with the header's scaling applied; a 2D image, one
slice of a 3D volume or of one volume of a 4D file is returned in the radiological display convention.
"""

from __future__ import annotations

import gzip

import numpy as np

from ..errors import MedicalImageError
from .common import _CORRUPT_FIX, _DecodedPixels, volume_slice


def _load_nifti_volume(path, data) -> np.ndarray:
    """Whole NIfTI array in RAS+ canonical orientation, scaling applied, float32."""
    import nibabel as nib

    name = str(path)
    try:
        if data is None:
            image = nib.load(str(path))
        else:
            raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else bytes(data)
            image_class = nib.Nifti2Image if raw[4:8] == b"n+2\0" else nib.Nifti1Image
            image = image_class.from_bytes(raw)
        image = nib.as_closest_canonical(image)
        return np.asarray(image.get_fdata(dtype=np.float32))
    except MedicalImageError:
        raise
    except Exception as error:  # nibabel raises many types for truncated or damaged files
        raise MedicalImageError(
            name, f"cannot read NIfTI ({type(error).__name__}: {error})", _CORRUPT_FIX
        ) from error


def _decode_nifti(path, data, name, frame, slice_index, slice_axis) -> _DecodedPixels:
    volume = _load_nifti_volume(path, data)
    if volume.ndim == 4:
        index = 0 if frame is None else frame
        if not 0 <= index < volume.shape[3]:
            raise MedicalImageError(
                name,
                f"volume {index} out of range (the file has {volume.shape[3]})",
                f"choose frame in 0..{volume.shape[3] - 1}",
            )
        volume = volume[..., index]
    if volume.ndim == 2:
        plane = volume[::-1, ::-1].T
    elif volume.ndim == 3:
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis}")
        size = volume.shape[slice_axis]
        index = size // 2 if slice_index is None else slice_index
        if not 0 <= index < size:
            raise MedicalImageError(
                name,
                f"slice {index} out of range along axis {slice_axis} ({size} slices)",
                f"choose slice_index in 0..{size - 1}",
            )
        plane = volume_slice(volume, slice_axis, index)
    else:
        raise MedicalImageError(
            name, f"unsupported NIfTI shape {volume.shape}", "pass a 2D, 3D or 4D NIfTI image"
        )
    plane = np.ascontiguousarray(plane, dtype=np.float32)
    return _DecodedPixels(plane, None, hu=plane)
