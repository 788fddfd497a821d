"""The DICOM reader (pydicom, imported on first use): single- and multi-frame files, and series folders.

Decoding with the installed pixel-data plugins (a clear error naming the transfer syntax when none can
decode it), the modality LUT (rescale slope/intercept, incl. enhanced multi-frame functional groups),
MONOCHROME1, colour and palette-colour images, and stacking a series folder into a RAS+ volume.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..errors import MedicalImageError
from .common import _CORRUPT_FIX, SUPPORTED_FORMATS, _DecodedPixels

_DICOM_DECODER_FIX = (
    "install decoder plugins (pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg covers "
    "JPEG lossless/extended, JPEG-LS and JPEG 2000), or decompress the file first "
    "(dcmdjpeg / dcmdjpls from DCMTK, or gdcmconv --raw)"
)


def _read_dicom_dataset(path, data, name: str):
    import pydicom

    source = io.BytesIO(data) if data is not None else path
    try:
        ds = pydicom.dcmread(source, force=True)
    except Exception as error:  # pydicom raises many types for a damaged or non-DICOM file
        raise MedicalImageError(
            name,
            f"not a readable DICOM file ({type(error).__name__}: {error})",
            f"{_CORRUPT_FIX}; supported formats are {SUPPORTED_FORMATS}",
        ) from error
    if "PixelData" not in ds:
        what = ds.get("Modality") or ds.get("SOPClassUID", "no recognisable DICOM attributes")
        raise MedicalImageError(
            name,
            f"no pixel data ({what})",
            f"pass an image file; supported formats are {SUPPORTED_FORMATS}",
        )
    return ds


def _dicom_decode(ds, index: int | None, name: str) -> np.ndarray:
    """Decoded pixels of one frame (index) or all frames (None), YBR converted to RGB."""
    from pydicom.pixels import get_decoder, pixel_array

    file_meta = getattr(ds, "file_meta", None)
    transfer_syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    try:
        return pixel_array(ds, index=index)
    except Exception as error:
        # pydicom's messages span lines (one per plugin); keep them readable in one log line.
        first_line = " ".join(str(error).split())[:400] or type(error).__name__
        undecodable = False
        if transfer_syntax is not None and transfer_syntax.is_compressed:
            try:
                undecodable = not get_decoder(transfer_syntax).is_available
            except NotImplementedError:
                undecodable = True
        if undecodable:
            raise MedicalImageError(
                name,
                f"the installed packages cannot decode transfer syntax {transfer_syntax.name} "
                f"({transfer_syntax}): {first_line}",
                _DICOM_DECODER_FIX,
            ) from error
        syntax = f" ({transfer_syntax.name})" if transfer_syntax is not None else ""
        compressed = transfer_syntax is not None and transfer_syntax.is_compressed
        fix = _DICOM_DECODER_FIX if compressed else _CORRUPT_FIX
        raise MedicalImageError(
            name, f"cannot decode pixel data{syntax}: {first_line}", fix
        ) from error


def _dicom_modality_lut(values: np.ndarray, ds, frame_index: int) -> np.ndarray:
    """Stored values -> modality units (HU for CT), float32.

    Classic images carry RescaleSlope/Intercept (or a Modality LUT) at the top level, which
    pydicom applies; enhanced multi-frame images carry them per frame in functional groups,
    which pydicom does not read, so we do.
    """
    from pydicom.pixels import apply_modality_lut

    if "RescaleSlope" in ds or "RescaleIntercept" in ds or "ModalityLUTSequence" in ds:
        return apply_modality_lut(values, ds).astype(np.float32)
    for sequence_name, item_index in (
        ("PerFrameFunctionalGroupsSequence", frame_index),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        groups = ds.get(sequence_name)
        if not groups or item_index >= len(groups):
            continue
        transformation = groups[item_index].get("PixelValueTransformationSequence")
        if transformation:
            slope = float(transformation[0].get("RescaleSlope", 1.0))
            intercept = float(transformation[0].get("RescaleIntercept", 0.0))
            return (values.astype(np.float64) * slope + intercept).astype(np.float32)
    return values.astype(np.float32)


def _decode_dicom(path, data, name: str, frame: int | None) -> _DecodedPixels:
    from pydicom.pixels import apply_color_lut

    ds = _read_dicom_dataset(path, data, name)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frame is None:
        # The middle frame: for a cine or a volume stored as frames it shows the anatomy.
        frame_index = n_frames // 2
    elif 0 <= frame < n_frames:
        frame_index = frame
    else:
        raise MedicalImageError(
            name,
            f"frame {frame} out of range (the file has {n_frames})",
            f"choose a frame in 0..{n_frames - 1}",
        )
    values = _dicom_decode(ds, frame_index if n_frames > 1 else None, name)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    dicom_modality = str(ds.get("Modality", "")).strip().upper() or None
    bits_stored = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)))

    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(values, ds)
        full_scale = 65535.0 if rgb.dtype == np.uint16 else 255.0
        return _DecodedPixels(
            rgb,
            full_scale,
            not_hu_reason="PALETTE COLOR DICOM is not CT",
            dicom_modality=dicom_modality,
        )
    if values.ndim == 3:  # colour; pydicom already converted YBR_* to RGB
        return _DecodedPixels(
            values,
            float(2**bits_stored - 1),
            not_hu_reason=f"colour ({photometric}) DICOM cannot hold Hounsfield units",
            dicom_modality=dicom_modality,
        )
    rescaled = _dicom_modality_lut(values, ds, frame_index)
    has_rescale = not np.array_equal(rescaled, values)
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    full_scale = 255.0 if bits_stored <= 8 and not signed and not has_rescale else None
    if dicom_modality is not None and dicom_modality != "CT":
        not_hu = (
            f"DICOM Modality is {dicom_modality}, not CT"
            " (or pass modality=None to let the file decide)"
        )
        hu = None
    else:
        not_hu, hu = "", rescaled
    return _DecodedPixels(
        rescaled,
        full_scale,
        invert=photometric == "MONOCHROME1",
        hu=hu,
        not_hu_reason=not_hu,
        dicom_modality=dicom_modality,
    )


def _read_dicom_series(folder: Path) -> np.ndarray:
    """A folder of single-frame DICOM slices -> RAS+ canonical volume [X, Y, Z] float32."""
    import nibabel as nib
    import pydicom

    name = str(folder)
    slices = []
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(file, force=True)
        except Exception:  # not DICOM (a README, a DICOMDIR index...): not part of the series
            continue
        if "PixelData" in ds and "ImagePositionPatient" in ds:
            slices.append((file, ds))
    if len(slices) < 2:
        raise MedicalImageError(
            name,
            f"found {len(slices)} DICOM slice(s) with a position",
            "a series folder needs at least 2 slices with ImagePositionPatient",
        )
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in slices}
    if len(series) > 1:
        raise MedicalImageError(
            name,
            f"holds {len(series)} DICOM series",
            "put each series in its own folder",
        )
    orientation = np.array(slices[0][1].ImageOrientationPatient, dtype=np.float64)
    row_direction, column_direction = orientation[:3], orientation[3:]
    normal = np.cross(row_direction, column_direction)
    slices.sort(
        key=lambda item: float(np.dot(normal, np.array(item[1].ImagePositionPatient, float)))
    )
    planes = [_dicom_modality_lut(_dicom_decode(ds, None, str(f)), ds, 0) for f, ds in slices]
    if len({p.shape for p in planes}) != 1 or planes[0].ndim != 2:
        raise MedicalImageError(
            name,
            "slices differ in size or are not grayscale",
            "pass a folder holding one grayscale series",
        )
    first = np.array(slices[0][1].ImagePositionPatient, dtype=np.float64)
    last = np.array(slices[-1][1].ImagePositionPatient, dtype=np.float64)
    row_spacing, column_spacing = (float(v) for v in slices[0][1].PixelSpacing)
    # Voxel (i = column, j = row, k = slice) -> patient LPS in mm, then LPS -> RAS for nibabel.
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_direction * column_spacing
    affine_lps[:3, 1] = column_direction * row_spacing
    affine_lps[:3, 2] = (last - first) / (len(planes) - 1)
    affine_lps[:3, 3] = first
    affine_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps
    volume = np.stack(planes, axis=-1).transpose(1, 0, 2)  # [rows, cols, k] -> [cols, rows, k]
    image = nib.as_closest_canonical(nib.Nifti1Image(volume.astype(np.float32), affine_ras))
    return np.asarray(image.dataobj, dtype=np.float32)
