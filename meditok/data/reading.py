"""Read any common medical image format into the tokenizer's input space.

One function family serves training, evaluation and the demo, so a model never sees pixels read
one way in training and another way at inference.

Value conventions (docs/method.md §3):
- The output of :func:`read_image` is a float32 tensor [3, H, W] in [-1, 1]; grayscale is
  repeated to 3 channels.
- 8-bit data (PNG, JPEG, 8-bit DICOM, colour DICOM): value / 255 -> [-1, 1].
- 16-bit PNG (not CT): value / 65535 -> [-1, 1], so every value above 255 stays distinct
  (`Image.convert('RGB')` would clip them, Pillow #5991). Pass ``window=(low, high)`` for data that
  uses only part of the range (e.g. 12-bit X-rays stored in 16-bit PNGs).
- CT (modality ``ct``, or a DICOM whose Modality is CT): pixels become Hounsfield units (16-bit
  PNG value - 1024; DICOM rescale slope/intercept; NIfTI values as stored), then a CT window maps
  them to [-1, 1] (named window, (low, high) in HU, or a callable such as
  :class:`meditok.data.transforms.RandomCTWindow`). Default window: ``common`` [-1000, 1000].
- Other high-bit-depth grayscale (MR/X-ray/NM DICOM, non-CT NIfTI): ``window=(low, high)`` in the
  file's units after the DICOM modality LUT if given, else the paper's MRI normalisation: clip to the
  0.5th-99.5th percentiles and min-max to [-1, 1].
- DICOM MONOCHROME1 (low values shown white) is inverted so that, as in MONOCHROME2, high means
  bright. CT is the exception: HU is a physical scale and every CT window assumes air = -1.
- Non-finite values (NaN, +Inf, -Inf; possible in float NIfTI/DICOM data or from a NaN/Inf
  rescale slope) are refused on every path, CT included: :func:`read_image`, :func:`read_ct_hu` and
  :func:`read_volume` raise :class:`MedicalImageError` naming the file and how many values are not
  finite. No value is guessed for them (a NaN region would otherwise become an arbitrary grey and a
  tokenizer would encode it), so the skip policies and quality control drop such a file with that
  reason. :func:`read_image` checks the slice it returns; :func:`read_volume` the whole volume.
- Any decoder failure (Pillow's DecompressionBombError for an image over ``PIL.Image.MAX_IMAGE_PIXELS``
  pixels, a truncated stream, a damaged DICOM or NIfTI) is a :class:`MedicalImageError` naming the file.
- Volume slices (NIfTI, DICOM series) come from the RAS+ canonical array and are shown in the
  radiological convention, as a DICOM viewer shows them: axial with anterior up and the patient's
  right on the image's left; coronal and sagittal with superior up (sagittal: anterior on the
  left). An axial slice of a DICOM series is therefore exactly the stored image.
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import numpy as np
import torch
from PIL import Image

from .errors import MedicalImageError
from .windows import CT_PNG_HU_OFFSET, DEFAULT_CT_WINDOW, ct_window, linear_window, window_bounds

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

_DICOM_DECODER_FIX = (
    "install decoder plugins (pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg covers "
    "JPEG lossless/extended, JPEG-LS and JPEG 2000), or decompress the file first "
    "(dcmdjpeg / dcmdjpls from DCMTK, or gdcmconv --raw)"
)
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


# --------------------------------------------------------------------------------------------
# Public API


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


# --------------------------------------------------------------------------------------------
# Decoding


def _read_head(path: PathLike, data: bytes | None, size: int = 512) -> bytes:
    """First bytes of the source, after checking it exists and is not empty."""
    name = str(path)
    if data is not None:
        if len(data) == 0:
            raise MedicalImageError(name, "image data is empty (0 bytes)", _CORRUPT_FIX)
        return bytes(data[:size])
    path = Path(path)
    if not path.exists():
        raise MedicalImageError(
            name,
            "file not found",
            "check the path; CSV identifiers are resolved against the dataset root folder",
        )
    if path.is_dir():
        raise MedicalImageError(name, "is a folder, not an image file", "point to an image file")
    if path.stat().st_size == 0:
        raise MedicalImageError(name, "file is empty (0 bytes)", _CORRUPT_FIX)
    with open(path, "rb") as handle:
        return handle.read(size)


def _is_nifti_header(head: bytes) -> bool:
    # NIfTI-1 magic at byte 344 ('n+1' single file, 'ni1' header/image pair); NIfTI-2 at byte 4.
    return head[344:348] in (b"n+1\0", b"ni1\0") or head[4:8] == b"n+2\0"


def _detect_format(head: bytes, name: str) -> str:
    """'png', 'jpeg', 'pillow', 'dicom' or 'nifti', from magic numbers (extensions lie)."""
    # DICOM first: the 128-byte preamble is free-form and often holds a TIFF header, so that one
    # file is both a valid DICOM and a valid TIFF.
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith((b"II*\0", b"MM\0*", b"BM", b"GIF87a", b"GIF89a")):
        return "pillow"
    if _is_nifti_header(head):
        return "nifti"
    if head.startswith(b"\x1f\x8b"):
        try:
            inner = gzip.GzipFile(fileobj=io.BytesIO(head)).read(348)
        except (OSError, EOFError):
            inner = b""
        if len(inner) >= 348 and _is_nifti_header(inner):
            return "nifti"
        if name.lower().endswith((".nii.gz", ".nii")):
            return "nifti"  # too short to tell: let nibabel say what is wrong
    lower = name.lower()
    if lower.endswith((".dcm", ".dicom", ".ima")) or "." not in Path(lower).name:
        # DICOM without the 128-byte preamble (old files, many PACS exports have no extension).
        return "dicom"
    if lower.endswith((".nii", ".nii.gz")):
        return "nifti"
    raise MedicalImageError(
        name,
        f"not a recognised image format (first bytes {head[:8]!r})",
        f"supported formats are {SUPPORTED_FORMATS}",
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


def _decode_pillow(path, data, name: str, frame: int | None) -> _DecodedPixels:
    source = io.BytesIO(data) if data is not None else path
    try:
        with Image.open(source) as image:
            if frame is not None:
                n_frames = getattr(image, "n_frames", 1)
                if not 0 <= frame < n_frames:
                    raise MedicalImageError(
                        name,
                        f"frame {frame} out of range (the file has {n_frames})",
                        f"choose a frame in 0..{n_frames - 1}",
                    )
                image.seek(frame)
            image.load()
            return _pillow_pixels(image, name)
    except MedicalImageError:
        raise
    except Image.DecompressionBombError as error:
        raise MedicalImageError(
            name,
            f"too large to decode safely ({error})",
            "downsample the image, or, for a file you trust, raise PIL.Image.MAX_IMAGE_PIXELS "
            "before reading it",
        ) from error
    except MemoryError:
        raise  # the process is out of memory: not a property of this file
    except Exception as error:  # Pillow's plugins raise many types for damaged or odd files
        raise MedicalImageError(
            name, f"cannot decode image ({type(error).__name__}: {error})", _CORRUPT_FIX
        ) from error


def _pillow_pixels(image: Image.Image, name: str) -> _DecodedPixels:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image)
        if values.min() < 0 or values.max() > 65535:
            raise MedicalImageError(
                name,
                f"32-bit integer image with values {values.min()}..{values.max()}",
                "store 16-bit unsigned data, or convert the file to PNG/DICOM",
            )
        values = values.astype(np.int32)
        return _DecodedPixels(values, 65535.0, hu=(values - CT_PNG_HU_OFFSET).astype(np.float32))
    if mode == "F":
        raise MedicalImageError(
            name,
            "floating-point image (mode F) has no defined intensity scale",
            "convert it to NIfTI (read with a window) or to 16-bit PNG",
        )
    not_hu = (
        f"{image.format or 'image'} mode {mode} has 8-bit samples, which cannot hold Hounsfield "
        "units; CT slices must be 16-bit PNGs holding HU + 1024"
    )
    if mode in ("L", "1", "LA", "P", "PA") and not _palette_has_colour(image):
        gray = image.convert("L") if mode != "L" else image
        return _DecodedPixels(np.asarray(gray), 255.0, not_hu_reason=not_hu)
    # Alpha is dropped, not composited: transparency carries no meaning in a medical image, and
    # compositing would change the stored intensities. Pillow reads 16-bit RGB(A) PNGs as 8-bit.
    return _DecodedPixels(np.asarray(image.convert("RGB")), 255.0, not_hu_reason=not_hu)


def _palette_has_colour(image: Image.Image) -> bool:
    if image.mode not in ("P", "PA"):
        return False
    rgb = np.asarray(image.convert("RGB"))
    return not (
        np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])
    )


# ----- DICOM


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


# ----- NIfTI


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


# --------------------------------------------------------------------------------------------
# Mapping to [-1, 1]


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
