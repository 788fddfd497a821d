"""Linear-probe features: frozen-tokenizer encoding of a task's splits, their on-disk cache, and :class:`FeatureTable`.

Each split is encoded once into token ids [N, 8, L] (int16) and pooled features [N, vit_width]; the cache is
keyed by the tokenizer's weights, the image size, the split and content hashes of the data (the .npz, or the
CSV and every image it lists). :class:`FeatureTable` serves probe rows per batch (the grid variant rebuilt
from the ids and the codebooks).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from meditok.data import CSVImageDataset, eval_transform
from meditok.data.samples import resolve_identifier

from .metrics import NonFiniteImageError, require_finite
from .probe_data import ProbeDataError, ProbeDataset, iter_npz_rows, npz_array_shape
from .progress import progress_options
from .report import relative
from .tokenizer import encode_for_evaluation, grid_features_from_ids

FEATURE_VARIANTS = ("grid", "pooled")
CACHE_FORMAT = 2  # 2: keyed by content hashes of the data (1: by the CSV's size and mtime only)


def uint8_batch_to_model_input(batch: np.ndarray, img_size: int) -> torch.Tensor:
    """MedMNIST uint8 images [B, H, W] or [B, H, W, 3] → [B, 3, img_size, img_size] in [-1, 1]
    (grey repeated to RGB; resize + centre crop as meditok.data.eval_transform)."""
    images = torch.tensor(batch, dtype=torch.float32) / 127.5 - 1.0  # a copy: stream buffers are read-only
    images = images[:, None].expand(-1, 3, -1, -1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    return eval_transform(img_size)(images.contiguous())


def content_hash(path: Path, memo: Optional[Dict[str, str]] = None) -> str:
    """SHA-1 of a file's contents ('missing' when there is no such file: extraction then names it).

    ``memo`` (path → hash) lets the splits of one run share the hash of one .npz; it must not outlive the run,
    since a file can change without changing its size or modification time.
    """
    path = Path(path)
    if not path.is_file():
        return "missing"
    key = str(path.resolve())
    if memo is not None and key in memo:
        return memo[key]
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha1").hexdigest()
    if memo is not None:
        memo[key] = digest
    return digest


def data_fingerprint(dataset: ProbeDataset, split: str, max_samples: Optional[int]) -> Dict[str, Any]:
    """What the cached features of a split were computed from, by content: the .npz file's SHA-1, or the CSV's
    SHA-1 and one SHA-1 over the (identifier, image SHA-1) of every image it lists (first max_samples rows)."""
    source = Path(dataset.paths[split])
    fingerprint = {"file": str(source.resolve()), "sha1": content_hash(source, dataset.content_hashes)}
    if dataset.kind == "csv":
        identifiers = pd.read_csv(source, dtype=str, keep_default_na=False)["identifier"].tolist()[:max_samples]
        images = hashlib.sha1()
        for identifier in identifiers:
            images.update(f"{identifier}\0{content_hash(resolve_identifier(identifier, dataset.root))}\n".encode())
        fingerprint.update({"images": len(identifiers), "images_sha1": images.hexdigest()})
    return fingerprint


def feature_cache_path(cache_dir: Path, dataset: ProbeDataset, split: str, img_size: int, tokenizer_key: str,
                       max_samples: Optional[int]) -> Tuple[Path, Dict[str, Any]]:
    key = {"format": CACHE_FORMAT, "tokenizer": tokenizer_key, "data": data_fingerprint(dataset, split, max_samples),
           "root": str(dataset.root.resolve()) if dataset.root else None, "split": split, "img_size": img_size,
           "max_samples": max_samples}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"{dataset.name}_{split}_{img_size}px_{digest}.npz", key


@torch.inference_mode()
def extract_features(model, dataset: ProbeDataset, split: str, img_size: int, batch_size: int, num_workers: int,
                     max_samples: Optional[int], progress: bool = True) -> Dict[str, np.ndarray]:
    """Token ids [N, 8, L] (int16) and pooled features [N, vit_width] (float32) of one split."""
    device = next(model.parameters()).device
    ids, pooled = [], []
    if dataset.kind == "npz":
        shape, _ = npz_array_shape(dataset.paths[split], f"{split}_images")
        total = shape[0] if max_samples is None else min(shape[0], max_samples)
        batches = (uint8_batch_to_model_input(chunk, img_size)
                   for chunk in iter_npz_rows(dataset.paths[split], f"{split}_images", batch_size, max_samples))
    else:
        images = CSVImageDataset(dataset.paths[split], root=dataset.root, transform=eval_transform(img_size),
                                 modality_column="modality" if _has_column(dataset.paths[split], "modality") else None)
        total = len(images) if max_samples is None else min(len(images), max_samples)
        loader = DataLoader(torch.utils.data.Subset(images, range(total)), batch_size=batch_size, num_workers=num_workers)
        batches = (batch["image"] for batch in loader)
    with tqdm(total=total, desc=f"encode {dataset.name}/{split}", unit="img", disable=not progress,
              **progress_options()) as bar:
        for images in batches:
            out = encode_for_evaluation(model, images.to(device), reconstruct=False)
            ids.append(out["ids"].to(torch.int16).cpu())
            pooled.append(out["pooled"].cpu())
            bar.update(len(images))
    return {"ids": torch.cat(ids).numpy(), "pooled": torch.cat(pooled).numpy()}


def _has_column(csv_path: Path, column: str) -> bool:
    return column in pd.read_csv(csv_path, nrows=0).columns


def load_or_extract(model, dataset: ProbeDataset, split: str, *, img_size: int, batch_size: int, num_workers: int,
                    cache_dir: Optional[Path], tokenizer_key: str, max_samples: Optional[int], progress: bool
                    ) -> Tuple[Dict[str, np.ndarray], str]:
    """Features of a split from the cache when present, else extracted (and cached). Returns (features, status)."""
    if cache_dir is not None:
        path, key = feature_cache_path(cache_dir, dataset, split, img_size, tokenizer_key, max_samples)
        if path.is_file():
            with np.load(path, allow_pickle=False) as cached:
                features = {"ids": cached["ids"], "pooled": cached["pooled"]}
            if len(features["ids"]) == len(dataset.labels[split]):
                return features, f"cache {relative(path)}"
    features = extract_features(model, dataset, split, img_size, batch_size, num_workers, max_samples, progress)
    try:
        require_finite(torch.from_numpy(features["pooled"]), f"{dataset.name}/{split}: the tokenizer's pooled features")
    except NonFiniteImageError as error:
        raise ProbeDataError(f"{error}; its weights are probably broken") from None
    if len(features["ids"]) != len(dataset.labels[split]):
        raise ProbeDataError(f"{dataset.source}: {split} has {len(features['ids'])} images but "
                             f"{len(dataset.labels[split])} labels")
    if cache_dir is None:
        return features, "computed (not cached)"
    cache_dir.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez(temporary, **features)
    os.replace(temporary, path)  # atomic: a crashed run never leaves a half-written cache file
    path.with_suffix(".json").write_text(json.dumps(key, indent=2))
    return features, f"computed, cached as {relative(path)}"


class FeatureTable:
    """Rows of probe features, materialised per batch (the grid variant is built from int16 ids, 32× smaller
    than its float features)."""

    def __init__(self, ids: Optional[torch.Tensor] = None, codebooks: Optional[torch.Tensor] = None,
                 dense: Optional[torch.Tensor] = None):
        if (dense is None) == (ids is None):
            raise ValueError("give either dense features or ids + codebooks")
        self.ids, self.codebooks, self.dense = ids, codebooks, dense

    @classmethod
    def from_dense(cls, features) -> "FeatureTable":
        return cls(dense=torch.as_tensor(np.asarray(features), dtype=torch.float32))

    @classmethod
    def from_ids(cls, ids, normalized_codebooks: torch.Tensor) -> "FeatureTable":
        return cls(ids=torch.as_tensor(np.asarray(ids)), codebooks=normalized_codebooks.detach().float().cpu())

    def __len__(self) -> int:
        return len(self.dense if self.dense is not None else self.ids)

    @property
    def dim(self) -> int:
        return self.rows(torch.arange(1)).shape[1]

    def to(self, device) -> "FeatureTable":
        if self.dense is not None:
            return FeatureTable(dense=self.dense.to(device))
        return FeatureTable(ids=self.ids.to(device), codebooks=self.codebooks.to(device))

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """float32 [len(index), dim]."""
        if self.dense is not None:
            return self.dense[index]
        return grid_features_from_ids(self.ids[index], self.codebooks)
