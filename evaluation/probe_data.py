"""Linear-probe tasks: MedMNIST .npz files and CSV image lists, read into a :class:`ProbeDataset` per task.

Holds the label conventions (multi-class [N] ints or multi-label [N, C] 0/1, :func:`infer_task`), streaming
reads of .npz arrays (a 224-px MedMNIST split never sits in memory), finding the medmnist package's files,
and the small-class warnings. Used by :mod:`evaluation.linear_probe` (the CLI) and :mod:`evaluation.volume`.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from .report import relative

SPLITS = ("train", "val", "test")
MIN_IMAGES_PER_CLASS = 10  # fewer train or test images of a class: warn that its metrics are noise
MULTI_CLASS, MULTI_LABEL = "multi-class", "multi-label"


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
