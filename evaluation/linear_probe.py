"""Linear probe on a frozen tokenizer — the paper's Table 2 (MedMNIST v2, mAP and AUC) from one command.

Protocol (docs/method.md §4): images resized to --img-size (default: the tokenizer's own size, 256 for the
released model, as in the paper; MedMNIST's 224-px files there), encoded by the frozen tokenizer; one linear layer trained with Adam (lr 1e-4, batch 128) on the train split; test
metrics after every epoch; the best (peak) test mAP and the best test AUC over the epochs are reported,
as in the paper. The test metrics at the epoch of best validation AUC are reported beside them when a
validation split exists (a protocol that does not look at the test set).

Feature variants (--features):
  grid    the quantised token grid flattened: [L x 64] per image (L = (img_size/16)^2; 16,384-d at 256 px),
          each 8-d chunk the unit-norm codeword of one of the 8 codebooks (the paper's probe input)
  pooled  the post-quantisation tokens averaged over the grid ([vit_width], 1,024-d for large): the vector
          MedITok's alignment head reads

Metrics (in %), from float64 log-odds of the probe's logits (no saturated probabilities): AUC = one-vs-rest
ROC AUC averaged over classes (multi-class; binary tasks are 2-class, where this equals the plain AUC) or
over labels (multi-label, e.g. ChestMNIST); mAP = average precision averaged the same way, except binary
tasks: AP of the positive class (label 1), with the mean over both classes in a second column
("mAP 2-class"); ACC = argmax accuracy (multi-label: element-wise at 0.5). The average row covers the
paper's five Table 2 datasets only; other datasets are averaged separately. A class with fewer than
10 train or test images (a label with fewer than 10 positives) gives a warning: its peaks are noise.

Cache: token ids and pooled features are cached under --cache-dir (default: OUT/cache), keyed by the
tokenizer's weights, the image size, the split and the SHA-1 of the contents of the data: the .npz file,
or the CSV and every image file it lists. Changing any image therefore re-encodes (hashing costs one read of
the files per run); --no-cache always re-encodes and writes nothing.

Examples:
  # MedMNIST files as the medmnist package writes them (e.g. ~/.medmnist/breastmnist_224.npz)
  python -m evaluation.linear_probe --checkpoint weights/meditok_simple_v1.pth --medmnist-root ~/.medmnist
  python -m evaluation.linear_probe --checkpoint weights/meditok_simple_v1.pth --npz data/chestmnist_224.npz
  # image lists: CSVs with identifier + a label column (or several 0/1 columns for multi-label)
  python -m evaluation.linear_probe --checkpoint weights/meditok_simple_v1.pth \\
      --train-csv train.csv --test-csv test.csv --root images/ --label-column label
  # smoke test (numbers meaningless)
  python -m evaluation.linear_probe --preset tiny --random-weights --npz tiny.npz --img-size 64 --epochs 3

Writes linear_probe.json, .md, .csv (one row per dataset and feature variant) and
linear_probe_history.csv (every epoch's test metrics) to --out.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from meditok.data import CSVImageDataset, MedicalImageError, eval_transform
from meditok.data.samples import resolve_identifier

from .metrics import NonFiniteImageError, class_log_odds, classification_metrics, require_finite
from .paper import PAPER, TABLE2_DATASETS, TABLE2_MEDITOK_AVERAGE
from .progress import progress_options
from .report import environment, markdown_table, relative, write_outputs
from .tokenizer import (add_tokenizer_arguments, encode_for_evaluation, grid_features_from_ids, labelled_warnings,
                        load_tokenizer, tokenizer_fingerprint)

FEATURE_VARIANTS = ("grid", "pooled")
SPLITS = ("train", "val", "test")
CACHE_FORMAT = 2  # 2: keyed by content hashes of the data (1: by the CSV's size and mtime only)
MIN_IMAGES_PER_CLASS = 10  # fewer train or test images of a class: warn that its metrics are noise
MULTI_CLASS, MULTI_LABEL = "multi-class", "multi-label"

PROTOCOL = {
    "classifier": "one torch.nn.Linear layer on frozen features (no normalisation, no hidden layer), initialised "
                  "at zero",
    "optimiser": "Adam, lr 1e-4 (default), batch 128, no weight decay, no schedule",
    "loss": "cross-entropy (multi-class, incl. 2-class binary tasks); BCE-with-logits (multi-label)",
    "reported": "peak test mAP and peak test AUC over the epochs (the paper's 'peak test mAP / AUC'), each "
                "with its epoch; also the test metrics at the epoch of best validation AUC when a val split exists",
    "auc": "ROC AUC, one-vs-rest macro mean over classes (multi-class) or mean over labels (multi-label); classes "
           "with one value only in the test set are left out",
    "map": "average precision (sum over recall steps of precision, ties grouped), averaged like AUC; for a binary "
           "(2-class) task the AP of the positive class (label 1); 'map_two_class' is the mean AP over both classes",
    "scores": "float64 per-class log-odds of the probe's logits (one-vs-rest for softmax tasks), not float32 "
              "probabilities, which tie at 1.0 for confident predictions",
    "average": "mean over the paper's Table 2 datasets present (" + ", ".join(TABLE2_DATASETS) + "); other datasets "
               "are averaged separately and never mixed into it",
    "acc": "argmax accuracy (multi-class); element-wise accuracy at probability 0.5 (multi-label)",
}


# --------------------------------------------------------------------------------------------------
# Reading MedMNIST .npz files and CSV image lists


class ProbeDataError(ValueError):
    """Probe data that cannot be used; the message names the file, the problem and the fix."""


def _npz_member(path: Path, key: str) -> str:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    member = f"{key}.npy"
    if member not in names:
        raise ProbeDataError(f"{path}: has no array {key!r} (arrays: {sorted(n[:-4] for n in names)}). A MedMNIST file "
                             f"holds train/val/test _images and _labels, as `medmnist` writes them.")
    return member


def _read_npy_header(handle) -> Tuple[Tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(handle)
    return np.lib.format.read_array_header_2_0(handle)


def npz_array_shape(path: Path, key: str) -> Tuple[Tuple[int, ...], np.dtype]:
    """Shape and dtype of one array in a .npz, read from its header without loading it."""
    member = _npz_member(path, key)
    with zipfile.ZipFile(path) as archive, archive.open(member) as handle:
        shape, _, dtype = _read_npy_header(handle)
    return tuple(shape), dtype


def iter_npz_rows(path: Path, key: str, chunk: int, limit: Optional[int] = None) -> Iterator[np.ndarray]:
    """Stream an array of a .npz in chunks of rows (a 224-px PathMNIST split is ~12 GB; it never sits in memory).

    Yields arrays [≤chunk, ...] in row order, up to ``limit`` rows.
    """
    member = _npz_member(path, key)
    with zipfile.ZipFile(path) as archive, archive.open(member) as handle:
        shape, fortran_order, dtype = _read_npy_header(handle)
        if fortran_order:
            raise ProbeDataError(f"{path}: {key} is stored in Fortran order; re-save it with numpy's default layout")
        rows = shape[0] if limit is None else min(shape[0], limit)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for start in range(0, rows, chunk):
            count = min(chunk, rows - start)
            buffer = handle.read(count * row_bytes)
            if len(buffer) != count * row_bytes:
                raise ProbeDataError(f"{path}: {key} ends early (truncated file?); download it again")
            yield np.frombuffer(buffer, dtype=dtype).reshape((count,) + tuple(shape[1:]))


def read_npz_labels(path: Path, split: str, limit: Optional[int] = None) -> np.ndarray:
    with np.load(path, allow_pickle=False) as archive:
        key = f"{split}_labels"
        if key not in archive.files:
            raise ProbeDataError(f"{path}: has no array {key!r} (arrays: {archive.files})")
        labels = archive[key]
    return labels[:limit] if limit is not None else labels


def npz_has_split(path: Path, split: str) -> bool:
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
    return f"{split}_images.npy" in names and f"{split}_labels.npy" in names


def infer_task(labels: Sequence[np.ndarray], source: str) -> Tuple[str, int]:
    """(task, number of classes) from label arrays: [N] or [N, 1] integers → multi-class with max+1 classes;
    [N, C > 1] of 0/1 → multi-label with C labels."""
    first = np.asarray(labels[0])
    if first.ndim == 2 and first.shape[1] > 1:
        values = np.unique(np.concatenate([np.unique(np.asarray(l)) for l in labels]))
        if not np.isin(values, (0, 1)).all():
            raise ProbeDataError(f"{source}: labels of shape {first.shape} look multi-label but hold values "
                                 f"{values[:10].tolist()}; multi-label labels must be 0/1")
        return MULTI_LABEL, first.shape[1]
    values = np.concatenate([np.asarray(l).reshape(-1) for l in labels])
    if values.size == 0 or values.min() < 0 or not np.all(np.equal(np.mod(values, 1), 0)):
        raise ProbeDataError(f"{source}: class labels must be non-negative integers, got values like {values[:10].tolist()}")
    return MULTI_CLASS, int(values.max()) + 1


@dataclass
class ProbeDataset:
    """One probe task: where each split's images come from and their labels."""

    name: str
    source: str
    kind: str                                  # 'npz' or 'csv'
    paths: Dict[str, Path]                     # split → .npz file or CSV
    labels: Dict[str, np.ndarray]              # split → [N] int or [N, C] 0/1
    task: str = MULTI_CLASS
    num_classes: int = 2
    class_names: Optional[List[str]] = None
    root: Optional[Path] = None
    notes: List[str] = field(default_factory=list)
    content_hashes: Dict[str, str] = field(default_factory=dict)   # file → SHA-1, for this run only

    @property
    def splits(self) -> List[str]:
        return [s for s in SPLITS if s in self.paths]


def medmnist_dataset(path: Path, max_samples: Optional[int] = None) -> ProbeDataset:
    """A MedMNIST .npz (``{name}.npz`` or ``{name}_{size}.npz``) as a probe task."""
    path = Path(path)
    if not path.is_file():
        raise ProbeDataError(f"{path}: MedMNIST file not found. {how_to_download('breastmnist', 224)} Then pass "
                             f"that folder as --medmnist-root, or the file as --npz.")
    name = path.stem
    splits = {s: path for s in SPLITS if npz_has_split(path, s)}
    for required in ("train", "test"):
        if required not in splits:
            raise ProbeDataError(f"{path}: no {required}_images/{required}_labels arrays; a probe needs train and test")
    labels = {s: read_npz_labels(path, s, max_samples) for s in splits}
    task, num_classes = infer_task(list(labels.values()), str(path))
    if task == MULTI_CLASS:
        labels = {s: l.reshape(-1).astype(np.int64) for s, l in labels.items()}
    dataset = ProbeDataset(name=name, source=str(path), kind="npz", paths=splits, labels=labels, task=task,
                           num_classes=num_classes)
    shape, _ = npz_array_shape(path, "train_images")
    if shape[1] < 224:
        dataset.notes.append(f"images are {shape[1]} px; the paper used MedMNIST's 224-px files (resized to 256)")
    return dataset


def small_sample_warnings(dataset: ProbeDataset, minimum: int = MIN_IMAGES_PER_CLASS) -> List[str]:
    """One warning per split that has a class (multi-label: a label's positives) with fewer than ``minimum``
    images, which makes that class's AUC/AP, and a peak over epochs of them, mostly noise."""
    warnings = []
    for split in ("train", "test"):
        labels = np.asarray(dataset.labels[split])
        if dataset.task == MULTI_LABEL:
            counts = labels.sum(axis=0)
        else:
            counts = np.bincount(labels.reshape(-1).astype(np.int64), minlength=dataset.num_classes)
        names = dataset.class_names or [str(c) for c in range(len(counts))]
        small = [f"{names[c]}: {int(n)}" for c, n in enumerate(counts) if n < minimum]
        if small:
            what = "positives per label" if dataset.task == MULTI_LABEL else "images per class"
            warnings.append(f"{dataset.name}: few {split} {what} ({', '.join(small[:8])}"
                            f"{' ...' if len(small) > 8 else ''}; fewer than {minimum}): its mAP/AUC are noise")
    return warnings


def how_to_download(name: str, size: int) -> str:
    """The medmnist package's own download (MedMNIST+ API), for error messages."""
    return (f"On a machine with internet access, `pip install medmnist` and run `python -c \"import medmnist as m; "
            f"getattr(m, m.INFO['{name}']['python_class'])(split='test', download=True, size={size})\"`: it writes "
            f"~/.medmnist/{name}{'' if size == 28 else f'_{size}'}.npz (all splits in one file).")


def find_medmnist_file(root: Path, name: str, size: int) -> Path:
    """``{root}/{name}_{size}.npz`` (medmnist's name for size > 28), else ``{root}/{name}.npz`` (28 px)."""
    candidates = [root / f"{name}_{size}.npz", root / f"{name}.npz"] if size != 28 else [root / f"{name}.npz"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ProbeDataError(f"{name}: none of {[str(c) for c in candidates]} exists. {how_to_download(name, size)} "
                         f"Then pass that folder as --medmnist-root, or choose --datasets among the files present.")


def csv_dataset(name: str, csvs: Dict[str, Path], root: Optional[Path], label_column: Optional[str],
                label_columns: Optional[List[str]], max_samples: Optional[int] = None) -> ProbeDataset:
    """Image-list CSVs (identifier + labels) as a probe task. Single-label: ``label_column`` holds class ids or
    names (names are numbered in sorted order); multi-label: ``label_columns`` each hold 0/1."""
    if bool(label_column) == bool(label_columns):
        raise ProbeDataError("CSV probes need exactly one of --label-column (one class per image) or --label-columns "
                             "(several 0/1 columns, multi-label)")
    tables = {}
    for split, csv_path in csvs.items():
        if not Path(csv_path).is_file():
            raise ProbeDataError(f"{csv_path}: {split} CSV not found; check --{split}-csv")
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
        wanted = [label_column] if label_column else list(label_columns)
        missing = [c for c in ["identifier"] + wanted if c not in table.columns]
        if missing:
            raise ProbeDataError(f"{csv_path}: missing column(s) {missing}; columns present: {list(table.columns)}. "
                                 f"Pass the label column's name with --label-column/--label-columns.")
        tables[split] = table.iloc[:max_samples] if max_samples is not None else table
    class_names = None
    if label_column:
        values = sorted({v.strip() for t in tables.values() for v in t[label_column]})
        if all(v.lstrip("-").isdigit() for v in values):
            # copy=True: a writable array (torch warns on pandas' read-only copy-on-write views)
            labels = {s: t[label_column].astype(int).to_numpy(copy=True) for s, t in tables.items()}
        else:
            class_names = values
            index = {v: i for i, v in enumerate(values)}
            labels = {s: np.array([index[v.strip()] for v in t[label_column]]) for s, t in tables.items()}
    else:
        try:
            labels = {s: t[list(label_columns)].astype(float).astype(int).to_numpy(copy=True) for s, t in tables.items()}
        except ValueError as error:
            raise ProbeDataError(f"multi-label columns {label_columns} must hold 0/1 ({error})") from None
    task, num_classes = infer_task(list(labels.values()), ", ".join(str(p) for p in csvs.values()))
    if class_names is not None:
        num_classes = len(class_names)
    return ProbeDataset(name=name, source=", ".join(f"{s}: {relative(p)}" for s, p in csvs.items()), kind="csv",
                        paths=dict(csvs), labels=labels, task=task, num_classes=num_classes, class_names=class_names,
                        root=root)


# --------------------------------------------------------------------------------------------------
# Features and their cache


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


# --------------------------------------------------------------------------------------------------
# The probe


@dataclass
class ProbeResult:
    history: List[Dict[str, Any]]
    best_map: Dict[str, Any]
    best_auc: Dict[str, Any]
    best_map_two_class: Dict[str, Any]  # binary tasks: peak of the two-class mean AP (NaN values otherwise)
    val_selected: Optional[Dict[str, Any]]
    final: Dict[str, Any]
    feature_dim: int
    seconds: float


@torch.no_grad()
def predict(layer: torch.nn.Linear, features: FeatureTable, task: str, batch_size: int = 1024) -> np.ndarray:
    """Per-class log-odds [N, C], float64 (:func:`evaluation.metrics.class_log_odds` of the layer's logits).

    The logits are computed in float64 too: float32 softmax probabilities tie at exactly 1.0 for confident
    predictions, which lowered the AUC of a perfectly ranked test set (100 % scored as 75 %).
    """
    device = layer.weight.device
    weight, bias = layer.weight.double(), layer.bias.double()
    logits = []
    for start in range(0, len(features), batch_size):
        rows = features.rows(torch.arange(start, min(start + batch_size, len(features)), device=device))
        logits.append(torch.nn.functional.linear(rows.double(), weight, bias).cpu())
    return class_log_odds(torch.cat(logits), task)


def train_linear_probe(train: FeatureTable, train_labels: np.ndarray, test: FeatureTable, test_labels: np.ndarray, *,
                       task: str, num_classes: int, epochs: int = 100, lr: float = 1e-4, batch_size: int = 128,
                       seed: int = 0, device: str = "cpu", val: Optional[FeatureTable] = None,
                       val_labels: Optional[np.ndarray] = None, progress: bool = True, desc: str = "probe") -> ProbeResult:
    """Train one linear layer on frozen features; evaluate the test (and val) split after every epoch.

    Args:
        train, test, val: feature rows [N, D]. *_labels: multi-class [N] ints in [0, num_classes);
            multi-label [N, num_classes] 0/1.
        task: 'multi-class' or 'multi-label'.

    Returns:
        :class:`ProbeResult` with per-epoch history and the peak test mAP / AUC (in %) with their epochs.
    """
    if task not in (MULTI_CLASS, MULTI_LABEL):
        raise ValueError(f"task must be {MULTI_CLASS!r} or {MULTI_LABEL!r}, got {task!r}")
    started = time.perf_counter()
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    train, test = train.to(device), test.to(device)
    val = val.to(device) if val is not None else None
    layer = torch.nn.Linear(train.dim, num_classes).to(device)
    # Start from zero: the problem is convex, and a random start would add a seed-dependent detour that
    # at lr 1e-4 takes many epochs to undo (a random layer can rank a class exactly backwards).
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    optimizer = torch.optim.Adam(layer.parameters(), lr=lr)
    if task == MULTI_CLASS:
        targets = torch.as_tensor(np.asarray(train_labels).reshape(-1), dtype=torch.long, device=device)
        loss_fn = torch.nn.CrossEntropyLoss()
    else:
        targets = torch.as_tensor(np.asarray(train_labels), dtype=torch.float32, device=device)
        loss_fn = torch.nn.BCEWithLogitsLoss()
    history = []
    bar = tqdm(range(1, epochs + 1), desc=desc, unit="epoch", disable=not progress, **progress_options())
    for epoch in bar:
        layer.train()
        order = torch.randperm(len(train), generator=generator).to(device)
        total_loss = 0.0
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            loss = loss_fn(layer(train.rows(index)), targets[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(index)
        layer.eval()
        record = {"epoch": epoch, "train_loss": total_loss / len(order)}
        record.update({f"test_{k}": v for k, v in classification_metrics(task, test_labels, predict(layer, test, task)).items()})
        if val is not None:
            record.update({f"val_{k}": v for k, v in classification_metrics(task, val_labels, predict(layer, val, task)).items()})
        history.append(record)
        bar.set_postfix(auc=f"{record['test_auc']:.2f}", map=f"{record['test_map']:.2f}")

    def best(key):
        finite = [h for h in history if np.isfinite(h[key])]
        return max(finite, key=lambda h: h[key]) if finite else history[-1]

    def metrics_at(record, prefix="test_"):
        return {"epoch": record["epoch"], **{k[len(prefix):]: v for k, v in record.items() if k.startswith(prefix)}}

    return ProbeResult(
        history=history,
        best_map=metrics_at(best("test_map")),
        best_auc=metrics_at(best("test_auc")),
        best_map_two_class=metrics_at(best("test_map_two_class")),
        val_selected=metrics_at(best("val_auc")) if val is not None else None,
        final=metrics_at(history[-1]),
        feature_dim=train.dim,
        seconds=time.perf_counter() - started,
    )


# --------------------------------------------------------------------------------------------------
# Outputs


def table2_dataset(name: str) -> Optional[str]:
    """The Table 2 dataset a probe task is ('breastmnist_224' → 'breastmnist'), or None."""
    stem = name.lower().split("_")[0]
    return stem if stem in TABLE2_DATASETS else None


def probe_averages(rows: List[Dict[str, Any]], variants: Sequence[str]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(average over the paper's Table 2 datasets, average over the other datasets), per feature variant.

    The paper's average covers its five Table 2 datasets; a run with more (e.g. ChestMNIST, a CSV task) reports
    those separately instead of mixing them into the number printed beside the paper's. Each entry:
    ``datasets`` (count), ``names``, ``map``, ``auc`` (means of the rows' peaks, None when no dataset) and
    ``map_two_class`` (the same mean with binary tasks' two-class mean AP in place of the positive-class AP).
    """
    def mean_of(chosen, key):
        return float(np.mean([r[key] for r in chosen])) if chosen else None

    def summary(chosen):
        two_class = [dict(r, best_map=r["best_map_two_class"]) if r.get("num_classes") == 2 and r["task"] == MULTI_CLASS
                     else r for r in chosen]
        return {"datasets": len(chosen), "names": [r["dataset"] for r in chosen], "map": mean_of(chosen, "best_map"),
                "auc": mean_of(chosen, "best_auc"), "map_two_class": mean_of(two_class, "best_map")}

    table2, other = {}, {}
    for variant in variants:
        chosen = [r for r in rows if r["features"] == variant]
        table2[variant] = summary([r for r in chosen if table2_dataset(r["dataset"])])
        extras = [r for r in chosen if not table2_dataset(r["dataset"])]
        if extras:
            other[variant] = summary(extras)
    return table2, other


def to_markdown(rows: List[Dict[str, Any]], averages: Dict[str, Dict[str, Any]], info: Dict[str, Any],
                other_averages: Optional[Dict[str, Dict[str, Any]]] = None) -> str:
    lines = [f"# Linear probe — {info['tokenizer']['source']}", ""]
    for warning in info["warnings"]:
        lines += [f"> **WARNING: {warning}.**", ""]
    protocol = info["settings"]
    lines += [f"Frozen tokenizer at {protocol['img_size']} px; one linear layer, Adam lr {protocol['lr']}, batch "
              f"{protocol['batch_size']}, {protocol['epochs']} epochs; peak test mAP / AUC over epochs (%). "
              f"Paper: {PAPER}, Table 2 (average over {', '.join(TABLE2_DATASETS)}).", ""]
    table = [[r["dataset"], r["features"], r["feature_dim"], _task_label(r), r["n_train"], r["n_test"], r["best_map"],
              r["best_map_epoch"], r.get("best_map_two_class"), r["best_auc"], r["best_auc_epoch"], r["acc_at_best_auc"],
              r.get("val_selected_auc"), r.get("val_selected_map")] for r in rows]
    for variant, average in averages.items():
        table.append([f"**average ({average['datasets']} of Table 2's {len(TABLE2_DATASETS)} datasets)**", variant, "",
                      "", "", "", average["map"], "", average["map_two_class"], average["auc"], "", "", None, None])
    table.append(["paper MedITok (Table 2 average)", "grid", "", "", "", "", TABLE2_MEDITOK_AVERAGE["map"], "", None,
                  TABLE2_MEDITOK_AVERAGE["auc"], "", "", None, None])
    for variant, average in (other_averages or {}).items():
        table.append([f"average of the other {average['datasets']} dataset(s), not in the paper's average", variant,
                      "", "", "", "", average["map"], "", average["map_two_class"], average["auc"], "", "", None, None])
    lines += [markdown_table(["dataset", "features", "dim", "task", "train", "test", "best mAP", "epoch",
                              "best mAP 2-class", "best AUC", "epoch", "ACC at best AUC", "AUC at best val",
                              "mAP at best val"], table), ""]
    lines += ["Binary tasks: mAP is the AP of the positive class (label 1); 'mAP 2-class' is the mean AP over both "
              "classes (in the average rows: the same average with that value for binary tasks).", ""]
    if other_averages:
        names = sorted({n for a in other_averages.values() for n in a["names"]})
        lines += [f"The average rows over Table 2's datasets leave out {', '.join(names)} (not in the paper's Table 2); "
                  f"they are averaged separately.", ""]
    missing = [d for d in TABLE2_DATASETS if d not in {table2_dataset(r["dataset"]) for r in rows}]
    if missing:
        lines += [f"The paper's average covers {', '.join(TABLE2_DATASETS)}; missing here: {', '.join(missing)}, so "
                  f"the averages are not directly comparable.", ""]
    for note in info["notes"]:
        lines += [f"- {note}"]
    lines += ["", "## Protocol", ""] + [f"- **{k}**: {v}" for k, v in PROTOCOL.items()]
    lines += ["- **features**: grid = quantised token grid flattened (L×64); pooled = post-quantisation tokens "
              "averaged over the grid (vit_width)", ""]
    return "\n".join(lines)


def _task_label(row: Dict[str, Any]) -> str:
    return "binary" if row["task"] == MULTI_CLASS and row.get("num_classes") == 2 else row["task"]


# --------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m evaluation.linear_probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data (MedMNIST .npz files and/or CSV image lists)")
    data.add_argument("--medmnist-root", type=Path, default=None, metavar="DIR",
                      help="folder of MedMNIST .npz files as the medmnist package writes them (e.g. ~/.medmnist)")
    data.add_argument("--datasets", nargs="+", default=list(TABLE2_DATASETS), metavar="NAME",
                      help=f"with --medmnist-root: which datasets (default: Table 2's {' '.join(TABLE2_DATASETS)}; "
                           "chestmnist is multi-label)")
    data.add_argument("--medmnist-size", type=int, default=224, choices=(28, 64, 128, 224),
                      help="which MedMNIST file size to look for: NAME_SIZE.npz, else NAME.npz (default 224, the paper's)")
    data.add_argument("--npz", type=Path, nargs="+", default=[], metavar="FILE", help="explicit MedMNIST-format .npz files")
    data.add_argument("--train-csv", type=Path, metavar="PATH", help="CSV image list for training (identifier + labels)")
    data.add_argument("--val-csv", type=Path, metavar="PATH", help="optional validation CSV (adds test metrics at the best-val epoch)")
    data.add_argument("--test-csv", type=Path, metavar="PATH", help="CSV image list for testing")
    data.add_argument("--root", type=Path, default=None, metavar="DIR", help="folder CSV identifiers are relative to")
    data.add_argument("--label-column", default=None, metavar="NAME", help="CSV column with one class (id or name) per image")
    data.add_argument("--label-columns", nargs="+", default=None, metavar="NAME", help="CSV 0/1 columns, one per label (multi-label)")
    data.add_argument("--name", default="csv", help="name of the CSV task in the tables (default csv)")
    data.add_argument("--max-samples", type=int, default=None, metavar="N", help="only the first N images of each split (smoke tests)")
    add_tokenizer_arguments(parser)
    probe = parser.add_argument_group("probe")
    probe.add_argument("--features", nargs="+", choices=FEATURE_VARIANTS, default=list(FEATURE_VARIANTS),
                       help="feature variants to probe (default: grid pooled)")
    probe.add_argument("--img-size", type=int, default=None, metavar="PX",
                       help="images are resized to this, a multiple of 16 (default: the tokenizer's own size, "
                            "256 for the released model, the paper's)")
    probe.add_argument("--epochs", type=int, default=100, metavar="N", help="training epochs; peaks are taken over them (default 100)")
    probe.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4, the paper's)")
    probe.add_argument("--batch-size", type=int, default=128, metavar="N", help="probe batch size (default 128, the paper's)")
    probe.add_argument("--encode-batch-size", type=int, default=64, metavar="N", help="images per tokenizer batch (default 64)")
    probe.add_argument("--num-workers", type=int, default=2, metavar="N", help="DataLoader workers for CSV images (default 2)")
    probe.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                       help="where token ids / pooled features are cached, keyed by the content of the data files and "
                            "images (default: OUT/cache)")
    probe.add_argument("--no-cache", action="store_true", help="always re-encode, read and write no cache")
    probe.add_argument("--out", type=Path, default=Path("outputs/linear_probe"), metavar="DIR", help="output folder (default outputs/linear_probe)")
    probe.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.img_size is not None and (args.img_size <= 0 or args.img_size % 16):
        parser.error(f"--img-size {args.img_size} must be a positive multiple of 16")
    has_csv = bool(args.train_csv or args.test_csv)
    if has_csv and not (args.train_csv and args.test_csv):
        parser.error("CSV probing needs both --train-csv and --test-csv")
    if not (args.medmnist_root or args.npz or has_csv):
        parser.error("no data: pass --medmnist-root DIR (MedMNIST .npz files), --npz FILE ..., or --train-csv/--test-csv")
    return args


def collect_datasets(args: argparse.Namespace) -> List[ProbeDataset]:
    files = list(args.npz)
    if args.medmnist_root:
        files += [find_medmnist_file(args.medmnist_root.expanduser(), name.lower(), args.medmnist_size)
                  for name in args.datasets]
    datasets = [medmnist_dataset(path, args.max_samples) for path in files]
    if args.train_csv:
        csvs = {"train": args.train_csv, "test": args.test_csv}
        if args.val_csv:
            csvs["val"] = args.val_csv
        datasets.append(csv_dataset(args.name, csvs, args.root, args.label_column, args.label_columns, args.max_samples))
    return datasets


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        datasets = collect_datasets(args)
    except ProbeDataError as error:
        raise SystemExit(f"error: {error}") from None
    model, tokenizer_info = load_tokenizer(args)
    device = next(model.parameters()).device
    codebooks = model.quantizer.normalized_codebooks().detach()
    tokenizer_key = tokenizer_fingerprint(model)
    img_size = args.img_size or model.config.img_size
    cache_dir = None if args.no_cache else (args.cache_dir or args.out / "cache")
    sample_warnings = [w for dataset in datasets for w in small_sample_warnings(dataset)]
    rows, history_rows, per_dataset, notes = [], [], [], []
    for dataset in datasets:
        notes += [f"{dataset.name}: {n}" for n in dataset.notes]
        features, status = {}, {}
        for split in dataset.splits:
            try:
                features[split], status[split] = load_or_extract(
                    model, dataset, split, img_size=img_size, batch_size=args.encode_batch_size,
                    num_workers=args.num_workers, cache_dir=cache_dir, tokenizer_key=tokenizer_key,
                    max_samples=args.max_samples, progress=not args.quiet)
            except (MedicalImageError, ProbeDataError) as error:
                raise SystemExit(f"error: {error}") from None
        entry = {"dataset": dataset.name, "source": dataset.source, "task": dataset.task,
                 "num_classes": dataset.num_classes, "class_names": dataset.class_names,
                 "splits": {s: len(dataset.labels[s]) for s in dataset.splits}, "features": status, "results": {}}
        for variant in args.features:
            def table(split):
                if variant == "grid":
                    return FeatureTable.from_ids(features[split]["ids"], codebooks)
                return FeatureTable.from_dense(features[split]["pooled"])

            has_val = "val" in dataset.splits
            result = train_linear_probe(
                table("train"), dataset.labels["train"], table("test"), dataset.labels["test"], task=dataset.task,
                num_classes=dataset.num_classes, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                seed=args.seed, device=str(device), val=table("val") if has_val else None,
                val_labels=dataset.labels.get("val"), progress=not args.quiet, desc=f"probe {dataset.name}/{variant}")
            row = {"dataset": dataset.name, "features": variant, "feature_dim": result.feature_dim, "task": dataset.task,
                   "num_classes": dataset.num_classes, "n_train": len(dataset.labels["train"]),
                   "n_test": len(dataset.labels["test"]), "best_map": result.best_map["map"],
                   "best_map_epoch": result.best_map["epoch"],
                   "best_map_two_class": result.best_map_two_class["map_two_class"],
                   "best_auc": result.best_auc["auc"],
                   "best_auc_epoch": result.best_auc["epoch"], "acc_at_best_auc": result.best_auc["acc"],
                   "final_map": result.final["map"], "final_auc": result.final["auc"], "seconds": result.seconds}
            if result.val_selected:  # test metrics at the epoch of best validation AUC
                row.update({"val_selected_epoch": result.val_selected["epoch"],
                            "val_selected_auc": result.val_selected["auc"], "val_selected_map": result.val_selected["map"]})
            rows.append(row)
            history_rows += [{"dataset": dataset.name, "features": variant, **h} for h in result.history]
            entry["results"][variant] = {"best_map": result.best_map, "best_auc": result.best_auc,
                                         "val_selected": result.val_selected, "final": result.final,
                                         "feature_dim": result.feature_dim, "seconds": result.seconds}
        per_dataset.append(entry)
    averages, other_averages = probe_averages(rows, args.features)
    info = {
        "task": "linear probe (paper Table 2)",
        "warnings": labelled_warnings(tokenizer_info) + sample_warnings,
        "tokenizer": tokenizer_info,
        "settings": {"img_size": img_size, "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                     "seed": args.seed, "features": args.features, "max_samples": args.max_samples},
        "protocol": PROTOCOL,
        "notes": notes,
        "paper_table2_meditok_average": {**TABLE2_MEDITOK_AVERAGE, "datasets": list(TABLE2_DATASETS), "source": PAPER},
        "environment": environment(device),
        "command": ["python", "-m", "evaluation.linear_probe"] + (sys.argv[1:] if argv is None else list(argv)),
    }
    payload = {**info, "results": rows, "average": averages, "average_other_datasets": other_averages,
               "datasets": per_dataset}
    markdown = to_markdown(rows, averages, info, other_averages)
    paths = write_outputs(args.out, "linear_probe", payload, markdown, {"": rows, "history": history_rows})
    print(markdown)
    print("wrote " + ", ".join(relative(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
