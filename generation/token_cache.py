"""Token caches: a dataset of images turned once into MedITok ids, read back as a PyTorch dataset.

A cache is a folder::

    ids.npy          uint16 [N, 8, h·w], memory-mapped: row i holds the 8 codebooks' ids of image i,
                     positions in raster order over the h × w token grid (h = w = img_size / 16)
    meta.csv         one line per row: row, label (int id), label_name, modality, caption,
                     identifier (where the image came from), augmentation ('none' or 'hflip')
    manifest.json    written last (its presence means the cache is complete): format, tokenizer
                     fingerprint / preset / source, image size and preprocessing, grid, counts per
                     label, label names (label id = index in this list), number of rows

While it is being written, finished chunks live in ``chunks/`` (with ``plan.json``, the settings they
were made with); a killed run started again with the same arguments keeps them and only tokenizes
what is missing. Rows of a cache are in source order (with ``flip``, image i gives rows 2i and 2i+1).

Two caches made with different tokenizers hold ids of different vocabularies: :class:`TokenCache`
records the tokenizer's fingerprint (SHA-256 over its weights) and :func:`check_same_tokenizer`
refuses to mix them.

The code is split by job, and all of it is re-exported here: the image sources (CSV, folder, MedMNIST .npz, shards)
are the registry of :mod:`meditok.data.sources` (``open_source``); writing is
:mod:`generation.token_cache_writer` (:func:`write_token_cache`); reading is :mod:`generation.token_cache_reader`
(:class:`TokenCache`, :func:`open_caches`, :func:`check_same_tokenizer`, the label helpers); the file names,
the error type and the label rule they share are in :mod:`generation.token_cache_format`.
"""
from __future__ import annotations

from typing import Any, Callable

from .token_cache_format import (CACHE_FORMAT, CHUNKS_DIR, IDS_FILE, MANIFEST_FILE, META_COLUMNS, META_FILE,
                                 PLAN_FILE, PathLike, TokenCacheError, resolve_label_names, tokenizer_fingerprint)
from .token_cache_reader import (TokenCache, check_same_tokenizer, label_coverage_warning, labels_with_rows,
                                 open_caches)
from .token_cache_writer import write_token_cache

__all__ = ["CACHE_FORMAT", "CHUNKS_DIR", "IDS_FILE", "MANIFEST_FILE", "META_COLUMNS",
           "META_FILE", "PLAN_FILE", "PathLike", "TokenCache", "TokenCacheError", "check_same_tokenizer", "csv_source",
           "folder_source", "label_coverage_warning", "labels_with_rows", "medmnist_source", "open_caches",
           "resolve_label_names", "shards_source", "tokenizer_fingerprint", "write_token_cache"]


# --------------------------------------------------------------------------------------------------
# Sources: meditok.data.sources, under the names and the error type this module has always had. They are
# imported on first use, so that `import generation` does not load meditok.data (and torchvision).

def _source_builder(name: str) -> Callable[..., Any]:
    def build(*args: Any, **kwargs: Any):
        from meditok.data import sources

        try:
            return getattr(sources, name)(*args, **kwargs)
        except sources.ImageSourceError as error:  # a missing folder / file / array, as before the move
            raise TokenCacheError(str(error)) from error

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"``meditok.data.sources.{name}`` (same arguments, same :class:`ImageSource`); a source that "
                     f"cannot be opened raises :class:`TokenCacheError`. Rows that cannot be read raise "
                     f"``meditok.data.MedicalImageError``.")
    return build


csv_source = _source_builder("csv_source")
folder_source = _source_builder("folder_source")
medmnist_source = _source_builder("medmnist_source")
shards_source = _source_builder("shards_source")


def __getattr__(name: str) -> Any:  # ImageSource, IMAGE_SUFFIXES: from meditok.data.sources on first use
    if name in ("ImageSource", "IMAGE_SUFFIXES"):
        from meditok.data import sources

        return getattr(sources, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
