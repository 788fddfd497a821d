"""Reading finished token caches: :class:`TokenCache` (a map-style dataset over ids.npy + meta.csv +
manifest.json), :func:`open_caches` / :func:`check_same_tokenizer` (caches whose ids mix), and the label
helpers. The folder layout is described in :mod:`generation.token_cache`."""
from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .token_cache_format import (CACHE_FORMAT, CHUNKS_DIR, IDS_FILE, MANIFEST_FILE, META_FILE, PathLike,
                                 TokenCacheError, resolve_label_names, short_fingerprint)


class TokenCache(Dataset):
    """A finished token cache, as a map-style dataset.

    ``cache[i]`` → dict(ids=LongTensor [8, h·w] with values in [0, codebook_size), label=int,
    caption=str, modality=str). Attributes: ``manifest`` (dict), ``fingerprint`` (the tokenizer's
    SHA-256), ``label_names`` (list; label id = index), ``grid`` ((h, w)), ``ids`` (the uint16 memmap
    [N, 8, h·w]), ``labels`` (int64 numpy array [N]).

    Args:
        path: the cache folder.
        label_names: map this cache's labels onto another vocabulary (e.g. the generator's training
            labels); a label outside it raises :class:`TokenCacheError`.
    """

    def __init__(self, path: PathLike, label_names: Optional[Sequence[str]] = None):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST_FILE
        if not manifest_path.is_file():
            hint = (" (unfinished: run the same tokenize_dataset command again to finish it)"
                    if (self.path / CHUNKS_DIR).is_dir() else "")
            raise TokenCacheError(f"{manifest_path}: not found, so {self.path} is not a finished token cache{hint}; "
                                  f"make one with `python -m generation.tokenize_dataset`")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != CACHE_FORMAT:
            raise TokenCacheError(f"{manifest_path}: format {self.manifest.get('format')!r}, expected {CACHE_FORMAT!r}")
        self.fingerprint: str = self.manifest["tokenizer_fingerprint"]
        self.grid: Tuple[int, int] = tuple(self.manifest["grid"])
        self.ids = self._open_ids()
        self._read_meta()
        own = list(self.manifest["label_names"])
        if label_names is None:
            self.label_names = own
        else:
            resolve_label_names([own[i] for i in np.unique(self.labels)], label_names, str(self.path / META_FILE))
            remap = np.array([list(label_names).index(n) if n in label_names else -1 for n in own], dtype=np.int64)
            self.labels = remap[self.labels]
            self.label_names = list(label_names)

    def _open_ids(self) -> np.ndarray:
        ids_path = self.path / IDS_FILE
        expected = tuple(self.manifest["ids_shape"])
        if expected[0] == 0:
            raise TokenCacheError(f"{ids_path}: the cache is empty (0 rows); tokenize a dataset with images")
        if not ids_path.is_file():
            raise TokenCacheError(f"{ids_path}: not found; the cache is incomplete, make it again")
        try:
            ids = np.load(ids_path, mmap_mode="r")
        except (ValueError, OSError) as error:
            raise TokenCacheError(f"{ids_path}: unreadable or truncated ({error}); make the cache again") from None
        if ids.shape != expected or ids.dtype != np.uint16:
            raise TokenCacheError(f"{ids_path}: holds {ids.dtype} {ids.shape}, the manifest says uint16 {expected}; "
                                  f"the file was replaced or truncated, make the cache again")
        return ids

    def _read_meta(self) -> None:
        meta_path = self.path / META_FILE
        if not meta_path.is_file():
            raise TokenCacheError(f"{meta_path}: not found; the cache is incomplete, make it again")
        with open(meta_path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        if len(rows) != len(self.ids):
            raise TokenCacheError(f"{meta_path}: {len(rows)} rows but ids.npy has {len(self.ids)}; make the cache again")
        self.labels = np.array([int(r["label"]) for r in rows], dtype=np.int64)
        self.captions = [r["caption"] for r in rows]
        self.modalities = [r["modality"] for r in rows]
        self.identifiers = [r["identifier"] for r in rows]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return {"ids": torch.from_numpy(self.ids[index].astype(np.int64)), "label": int(self.labels[index]),
                "caption": self.captions[index], "modality": self.modalities[index]}

    def batch(self, indices: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Many rows at once: (ids LongTensor [B, 8, h·w], labels LongTensor [B]) — faster than a DataLoader."""
        index = np.asarray(indices, dtype=np.int64)
        order = np.argsort(index)  # sorted reads are kinder to a memmap
        ids = np.empty((len(index),) + self.ids.shape[1:], dtype=np.int64)
        ids[order] = self.ids[index[order]]
        return torch.from_numpy(ids), torch.from_numpy(self.labels[index])

    @property
    def num_codebooks(self) -> int:
        return int(self.ids.shape[1])

    @property
    def codebook_size(self) -> int:
        return int(self.manifest.get("codebook_size", 4096))

    @property
    def img_size(self) -> int:
        return int(self.manifest["img_size"])

    def rows_of_label(self, label: int) -> np.ndarray:
        return np.flatnonzero(self.labels == label)


def check_same_tokenizer(*caches: TokenCache) -> None:
    """Refuse caches made by different tokenizers or at different image sizes (their ids do not mix)."""
    first = caches[0]
    for other in caches[1:]:
        if other.fingerprint != first.fingerprint:
            raise TokenCacheError(
                f"token caches from different tokenizers: {first.path} has tokenizer "
                f"{short_fingerprint(first.fingerprint)} "
                f"({first.manifest.get('tokenizer_source') or first.manifest.get('tokenizer_preset')}), {other.path} has "
                f"{short_fingerprint(other.fingerprint)} "
                f"({other.manifest.get('tokenizer_source') or other.manifest.get('tokenizer_preset')}); "
                f"tokenize both with the same --checkpoint")
        if other.grid != first.grid:
            raise TokenCacheError(f"token caches with different token grids: {first.path} {first.grid} "
                                  f"(img_size {first.img_size}) vs {other.path} {other.grid} (img_size {other.img_size}); "
                                  f"tokenize both with the same --img-size")


def labels_with_rows(cache: TokenCache) -> List[str]:
    """Label names that have at least one row in the cache, in label-id order."""
    counts = cache.manifest.get("counts_per_label") or Counter(cache.label_names[i] for i in cache.labels.tolist())
    return [name for name in cache.label_names if counts.get(name, 0) > 0]


def label_coverage_warning(reference: TokenCache, other: TokenCache) -> Optional[str]:
    """One line when ``other`` (a validation or test cache) has no rows of labels that ``reference`` (the
    training cache) has; None when it covers them all. Scores on ``other`` (validation loss, per-label FID)
    then say nothing about the missing labels."""
    present = set(labels_with_rows(other))
    trained = labels_with_rows(reference)
    missing = [name for name in trained if name not in present]
    if not missing:
        return None
    covered = [name for name in trained if name in present]
    return (f"{other.path} has rows of {len(covered)} of the {len(trained)} labels of {reference.path}: none of "
            f"{', '.join(missing)}; scores on it cover {', '.join(covered) or 'no label'} only (add images of "
            f"the missing labels to that split to check them)")


def open_caches(paths: Sequence[PathLike], label_names: Optional[Sequence[str]] = None) -> List[TokenCache]:
    """Open several caches made by one tokenizer, all labelled in one vocabulary (default: the union of names)."""
    caches = [TokenCache(p) for p in paths]
    check_same_tokenizer(*caches)
    names = list(label_names) if label_names is not None else sorted({n for c in caches for n in c.label_names})
    return [TokenCache(p, label_names=names) for p in paths]
