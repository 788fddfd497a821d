"""Format detection: the first bytes of a file (or of in-memory data) and the format they name.

Magic numbers decide, not extensions (extensions lie); an extension only breaks a tie for DICOM without
its preamble and for NIfTI too short to tell.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

from ..errors import MedicalImageError
from .common import _CORRUPT_FIX, SUPPORTED_FORMATS, PathLike


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
