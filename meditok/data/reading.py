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

The readers live in :mod:`meditok.data.readers`, one module per format (``pillow``, ``dicom``, ``nifti``)
beside the shared format detection (``detect``), mapping to [-1, 1] (``intensity``) and dispatch
(``dispatch``); this module re-exports their names, so imports from ``meditok.data.reading`` keep working.
"""

from __future__ import annotations

# Re-exports: every name this module defined (and MedicalImageError, which it imported) before the
# readers moved to meditok/data/readers/.
from .errors import MedicalImageError
from .readers.common import (
    _CORRUPT_FIX,
    AXIS_NAMES,
    ROBUST_PERCENTILES,
    SUPPORTED_FORMATS,
    CTWindowArg,
    PathLike,
    _DecodedPixels,
    _require_finite,
    normalise_modality,
    volume_slice,
)
from .readers.detect import _detect_format, _is_nifti_header, _read_head
from .readers.dicom import (
    _DICOM_DECODER_FIX,
    _decode_dicom,
    _dicom_decode,
    _dicom_modality_lut,
    _read_dicom_dataset,
    _read_dicom_series,
)
from .readers.dispatch import _decode, _read_volume_values, read_ct_hu, read_image, read_volume
from .readers.intensity import _require_hu, _to_signed_rgb, _window_ct
from .readers.nifti import _decode_nifti, _load_nifti_volume
from .readers.pillow import _decode_pillow, _palette_has_colour, _pillow_pixels

# what this module re-exports (its names before the split), so pyflakes and readers know they are meant
__all__ = [
    "AXIS_NAMES",
    "CTWindowArg",
    "MedicalImageError",
    "PathLike",
    "ROBUST_PERCENTILES",
    "SUPPORTED_FORMATS",
    "_CORRUPT_FIX",
    "_DICOM_DECODER_FIX",
    "_DecodedPixels",
    "_decode",
    "_decode_dicom",
    "_decode_nifti",
    "_decode_pillow",
    "_detect_format",
    "_dicom_decode",
    "_dicom_modality_lut",
    "_is_nifti_header",
    "_load_nifti_volume",
    "_palette_has_colour",
    "_pillow_pixels",
    "_read_dicom_dataset",
    "_read_dicom_series",
    "_read_head",
    "_read_volume_values",
    "_require_finite",
    "_require_hu",
    "_to_signed_rgb",
    "_window_ct",
    "normalise_modality",
    "read_ct_hu",
    "read_image",
    "read_volume",
    "volume_slice",
]
