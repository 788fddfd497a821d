"""The Pillow reader: PNG (8- and 16-bit, incl. CT slices stored as HU + 1024), JPEG, TIFF, BMP and GIF.

16-bit grayscale keeps its full scale (65535) and also yields HU; 8-bit grayscale, palette images without
colour and 'LA' are read as grayscale; RGBA and colour palettes as RGB, alpha dropped.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ..errors import MedicalImageError
from ..windows import CT_PNG_HU_OFFSET
from .common import _CORRUPT_FIX, _DecodedPixels


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
