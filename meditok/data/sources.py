"""Image sources: where a fixed, ordered set of images and their labels comes from, in one registry.

A source turns some images on disk into an :class:`ImageSource`: a dataset whose items are
``{"image": float [3, S, S] in [-1, 1], "caption", "identifier", "modality"}`` (every image read with
:func:`meditok.data.read_image` or from uint8 pixels, then :func:`meditok.data.eval_transform`), the label
of every item, and a description (a JSON-able dict) that says exactly which files were read. Token caches
(``generation.tokenize_dataset``) record that description in their fingerprint; evaluation reads real
images through the same sources.

Kinds (``SOURCES``; ``open_source(kind, **options)`` builds one)::

    csv       csv_source(csv_path, root, img_size, label_column="modality", ...)   a metadata CSV
    folder    folder_source(folder, img_size, ...)        FOLDER/<label>/**/<image>, like ImageFolder
    medmnist  medmnist_source(npz_files, split, img_size)  MedMNIST .npz files, label = subset name
    shards    shards_source(shards, img_size)              webdataset shards (scripts/data/csv_to_shards.py)

A new kind is a function returning an :class:`ImageSource`, decorated with ``@register_source("name")``.
A source that cannot be opened (a missing folder or file, no images, a missing array, an unknown kind) raises
:class:`ImageSourceError` (bad input); an image or CSV row that cannot be read raises
:class:`meditok.data.MedicalImageError`, as everywhere in ``meditok.data``.
"""
from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .csv_dataset import CSVImageDataset
from .paths import resolve_under_root
from .reading import read_image
from .samples import read_metadata_csv
from .shards import ShardedImageDataset, resolve_shards
from .transforms import eval_transform

PathLike = Union[str, os.PathLike]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".nii", ".nii.gz")


class ImageSourceError(ValueError):
    """A source that cannot be opened (a missing folder, file or array, no images, an unknown kind): bad input,
    not a bad image. The message names the path and the fix."""


@dataclass
class ImageSource:
    """Images in a fixed order.

    ``dataset[i]`` is a dict with ``image`` float [3, S, S] in [-1, 1], ``caption`` (str),
    ``identifier`` (str) and ``modality`` (str); ``labels[i]`` is the label value (a string) of item i,
    ``modalities[i]`` its modality. ``description`` names the kind and the files read (JSON-able; token
    caches store it in their fingerprint, so a builder must keep it stable). ``iterable`` sources
    (webdataset shards) are read front to back instead of indexed.
    """

    dataset: Any
    labels: List[str]
    modalities: List[str]
    description: Dict[str, Any]
    iterable: bool = False

    def __len__(self) -> int:
        return len(self.labels)


SourceBuilder = Callable[..., ImageSource]
SOURCES: Dict[str, SourceBuilder] = {}


def register_source(name: str) -> Callable[[SourceBuilder], SourceBuilder]:
    """Decorator: make a builder (keyword options → :class:`ImageSource`) known to :func:`open_source` as ``name``."""

    def register(build: SourceBuilder) -> SourceBuilder:
        known = SOURCES.get(name)
        if known is not None and known is not build:
            raise ValueError(f"image source kind {name!r} is already registered "
                             f"({known.__module__}.{known.__qualname__}); pick another name")
        SOURCES[name] = build
        return build

    return register


def open_source(kind: str, **options: Any) -> ImageSource:
    """The images of source ``kind`` (a key of :data:`SOURCES`), built from ``options`` (the builder's arguments)."""
    build = SOURCES.get(kind)
    if build is None:
        raise ImageSourceError(f"unknown image source kind {kind!r}; the known kinds are {', '.join(sorted(SOURCES))}")
    return build(**options)


# --------------------------------------------------------------------------------------------------
# The kinds

@register_source("csv")
def csv_source(csv_path: PathLike, root: Optional[PathLike], img_size: int, label_column: str = "modality",
               image_column: str = "identifier", allow_outside_root: bool = False) -> ImageSource:
    """A metadata CSV (``identifier, caption, modality`` as in training), read by :class:`CSVImageDataset`.

    Images go through ``eval_transform(img_size)`` (resize short side, centre crop); CT rows are windowed
    with the default window, exactly as evaluation reads them. With a root, rows leading outside it are
    refused unless ``allow_outside_root`` (:func:`meditok.data.resolve_under_root`).
    """
    table = read_metadata_csv(csv_path, [image_column, label_column], ["modality", "caption"])
    has_modality = "modality" in table.columns
    dataset = CSVImageDataset(csv_path, root, transform=eval_transform(img_size), image_column=image_column,
                              modality_column="modality" if has_modality else None,
                              allow_outside_root=allow_outside_root)
    labels = [str(v) for v in table[label_column].tolist()]
    modalities = [str(v) for v in table["modality"].tolist()] if has_modality else labels
    return ImageSource(dataset, labels, modalities,
                       {"kind": "csv", "csv": str(csv_path), "root": None if root is None else str(root),
                        "label_column": label_column, "rows": len(labels)})


class _FolderImages(Dataset):
    def __init__(self, files: List[Path], root: Path, img_size: int):
        self.files, self.root, self.transform = files, root, eval_transform(img_size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        path = self.files[index]
        label = path.relative_to(self.root).parts[0]
        return {"image": self.transform(read_image(path)), "caption": "", "modality": label,
                "identifier": str(path.relative_to(self.root))}


@register_source("folder")
def folder_source(folder: PathLike, img_size: int, allow_outside_root: bool = False) -> ImageSource:
    """A folder with one sub-folder per label (``folder/<label>/**/<image>``), like torchvision's ImageFolder.

    Files found there are listed under the folder, but a symlink among them may lead out of it: such
    files are refused (:func:`meditok.data.resolve_under_root`) unless ``allow_outside_root``.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ImageSourceError(f"{root}: image folder not found; pass --folder DIR with one sub-folder per label")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[:-1]
                   and any(p.name.lower().endswith(s) for s in IMAGE_SUFFIXES))
    if not files:
        raise ImageSourceError(f"{root}: no images in sub-folders (expected {root}/<label>/<image>.png etc.)")
    dir_cache: Dict[str, str] = {}
    for path in files:
        resolve_under_root(root, path.relative_to(root), allow_outside_root=allow_outside_root,
                           source=f"image folder {root}", dir_cache=dir_cache)
    labels = [p.relative_to(root).parts[0] for p in files]
    return ImageSource(_FolderImages(files, root, img_size), labels, list(labels),
                       {"kind": "folder", "folder": str(root), "rows": len(files)})


class _NpzImages(Dataset):
    def __init__(self, arrays: List[np.ndarray], names: List[str], img_size: int):
        self.arrays, self.names, self.transform = arrays, names, eval_transform(img_size)
        self.offsets = np.cumsum([0] + [len(a) for a in arrays])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> Dict[str, Any]:
        part = int(np.searchsorted(self.offsets, index, side="right") - 1)
        local = index - int(self.offsets[part])
        pixels = torch.from_numpy(np.asarray(self.arrays[part][local]))
        pixels = pixels[None].expand(3, -1, -1) if pixels.ndim == 2 else pixels.permute(2, 0, 1)
        image = pixels.float().div(127.5).sub(1.0)  # uint8 → [-1, 1]
        return {"image": self.transform(image), "caption": "", "modality": self.names[part],
                "identifier": f"{self.names[part]}:{local}"}


@register_source("medmnist")
def medmnist_source(npz_files: Sequence[PathLike], split: str, img_size: int) -> ImageSource:
    """MedMNIST ``.npz`` files (``{split}_images`` uint8 [N, H, W] or [N, H, W, 3]); the label of every
    image is its file's subset name ('bloodmnist_224.npz' → 'bloodmnist'), the paper's modality label."""
    arrays, names = [], []
    for file in npz_files:
        path = Path(file)
        if not path.is_file():
            raise ImageSourceError(f"{path}: MedMNIST file not found")
        data = np.load(path, mmap_mode="r")
        key = f"{split}_images"
        if key not in data.files:
            raise ImageSourceError(f"{path}: no array {key!r} (arrays: {data.files}); pass --split train|val|test")
        arrays.append(data[key])
        names.append(path.stem.split("_")[0])
    labels = [name for array, name in zip(arrays, names) for _ in range(len(array))]
    return ImageSource(_NpzImages(arrays, names, img_size), labels, list(labels),
                       {"kind": "medmnist", "files": [str(f) for f in npz_files], "split": split, "rows": len(labels)})


@register_source("shards")
def shards_source(shards: str, img_size: int) -> ImageSource:
    """Webdataset shards written by ``scripts/data/csv_to_shards.py`` (read front to back; label = modality)."""
    paths, _ = resolve_shards(shards)
    labels: List[str] = []
    for path in paths:  # labels first, from the small JSON members only (no image decoding)
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    labels.append(str(json.load(tar.extractfile(member)).get("modality", "")))
    dataset = ShardedImageDataset(paths, transform=eval_transform(img_size), rank=0, world_size=1)
    return ImageSource(dataset, labels, list(labels), {"kind": "shards", "shards": str(shards), "rows": len(labels)},
                       iterable=True)
