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
"""
from __future__ import annotations

import csv
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from meditok.checkpoint import weights_fingerprint as meditok_weights_fingerprint
from torch.utils.data import DataLoader, Dataset, Subset

from meditok import atomic_write, atomic_write_via_path

CACHE_FORMAT = "meditok-token-cache-v1"
IDS_FILE = "ids.npy"
META_FILE = "meta.csv"
MANIFEST_FILE = "manifest.json"
CHUNKS_DIR = "chunks"
PLAN_FILE = "plan.json"
META_COLUMNS = ("row", "label", "label_name", "modality", "caption", "identifier", "augmentation")
PathLike = Union[str, os.PathLike]


class TokenCacheError(ValueError):
    """A token cache that is missing, incomplete, or incompatible; the message names the file and the fix."""


# --------------------------------------------------------------------------------------------------
# Tokenizer identity

tokenizer_fingerprint = meditok_weights_fingerprint  # the name this package has always used


def _short(fingerprint: str) -> str:
    return fingerprint[:16]


# --------------------------------------------------------------------------------------------------
# Sources: where images and labels come from

@dataclass
class ImageSource:
    """Images to tokenize, in a fixed order.

    ``dataset[i]`` is a dict with ``image`` float [3, S, S] in [-1, 1], ``caption`` (str),
    ``identifier`` (str) and ``modality`` (str); ``labels[i]`` is the label value (a string) of item i.
    ``iterable`` sources (webdataset shards) are read front to back instead of indexed.
    """

    dataset: Any
    labels: List[str]
    modalities: List[str]
    description: Dict[str, Any]
    iterable: bool = False

    def __len__(self) -> int:
        return len(self.labels)


def csv_source(csv_path: PathLike, root: Optional[PathLike], img_size: int, label_column: str = "modality",
               image_column: str = "identifier", allow_outside_root: bool = False) -> ImageSource:
    """A metadata CSV (``identifier, caption, modality`` as in training), read by ``meditok.data``.

    Images go through ``meditok.data.eval_transform(img_size)`` (resize short side, centre crop);
    CT rows are windowed with the default window, exactly as evaluation reads them. With a root, rows
    leading outside it are refused unless ``allow_outside_root`` (``meditok.data.resolve_under_root``).
    """
    from meditok.data import CSVImageDataset, eval_transform
    from meditok.data.samples import read_metadata_csv

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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".nii", ".nii.gz")


class _FolderImages(Dataset):
    def __init__(self, files: List[Path], root: Path, img_size: int):
        from meditok.data import eval_transform

        self.files, self.root, self.transform = files, root, eval_transform(img_size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        from meditok.data import read_image

        path = self.files[index]
        label = path.relative_to(self.root).parts[0]
        return {"image": self.transform(read_image(path)), "caption": "", "modality": label,
                "identifier": str(path.relative_to(self.root))}


def folder_source(folder: PathLike, img_size: int, allow_outside_root: bool = False) -> ImageSource:
    """A folder with one sub-folder per label (``folder/<label>/**/<image>``), like torchvision's ImageFolder.

    Files found there are listed under the folder, but a symlink among them may lead out of it: such
    files are refused (``meditok.data.resolve_under_root``) unless ``allow_outside_root``.
    """
    from meditok.data import resolve_under_root

    root = Path(folder)
    if not root.is_dir():
        raise TokenCacheError(f"{root}: image folder not found; pass --folder DIR with one sub-folder per label")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[:-1]
                   and any(p.name.lower().endswith(s) for s in IMAGE_SUFFIXES))
    if not files:
        raise TokenCacheError(f"{root}: no images in sub-folders (expected {root}/<label>/<image>.png etc.)")
    dir_cache: Dict[str, str] = {}
    for path in files:
        resolve_under_root(root, path.relative_to(root), allow_outside_root=allow_outside_root,
                           source=f"image folder {root}", dir_cache=dir_cache)
    labels = [p.relative_to(root).parts[0] for p in files]
    return ImageSource(_FolderImages(files, root, img_size), labels, list(labels),
                       {"kind": "folder", "folder": str(root), "rows": len(files)})


class _NpzImages(Dataset):
    def __init__(self, arrays: List[np.ndarray], names: List[str], img_size: int):
        from meditok.data import eval_transform

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


def medmnist_source(npz_files: Sequence[PathLike], split: str, img_size: int) -> ImageSource:
    """MedMNIST ``.npz`` files (``{split}_images`` uint8 [N, H, W] or [N, H, W, 3]); the label of every
    image is its file's subset name ('bloodmnist_224.npz' → 'bloodmnist'), the paper's modality label."""
    arrays, names = [], []
    for file in npz_files:
        path = Path(file)
        if not path.is_file():
            raise TokenCacheError(f"{path}: MedMNIST file not found")
        data = np.load(path, mmap_mode="r")
        key = f"{split}_images"
        if key not in data.files:
            raise TokenCacheError(f"{path}: no array {key!r} (arrays: {data.files}); pass --split train|val|test")
        arrays.append(data[key])
        names.append(path.stem.split("_")[0])
    labels = [name for array, name in zip(arrays, names) for _ in range(len(array))]
    return ImageSource(_NpzImages(arrays, names, img_size), labels, list(labels),
                       {"kind": "medmnist", "files": [str(f) for f in npz_files], "split": split, "rows": len(labels)})


def shards_source(shards: str, img_size: int) -> ImageSource:
    """Webdataset shards written by ``scripts/data/csv_to_shards.py`` (read front to back; label = modality)."""
    import tarfile

    from meditok.data import ShardedImageDataset, eval_transform
    from meditok.data.shards import resolve_shards

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


# --------------------------------------------------------------------------------------------------
# Writing

def _write_json(path: Path, payload: Dict[str, Any]) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(payload, indent=2) + "\n").encode()))


def resolve_label_names(labels: Sequence[str], label_names: Optional[Sequence[str]], where: str) -> List[str]:
    """The label vocabulary: ``label_names`` when given (every value must be in it), else the sorted values."""
    if label_names is None:
        return sorted(set(labels))
    unseen = sorted(set(labels) - set(label_names))
    if unseen:
        raise TokenCacheError(f"{where}: label value(s) {unseen} are not in the label names {list(label_names)}; "
                              f"tokenize with the same label column, or build the label list from this data "
                              f"(leave --label-names-from unset)")
    return list(label_names)


def _collate(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    return {"image": torch.stack([s["image"] for s in samples]),
            "caption": [str(s.get("caption", "")) for s in samples],
            "identifier": [str(s.get("identifier", "")) for s in samples]}


def _chunk_name(index: int) -> str:
    return f"chunk-{index:06d}"


@torch.inference_mode()
def _tokenize(model: torch.nn.Module, images: torch.Tensor, flip: bool, amp_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """[B, 3, S, S] → ids [B·(2 if flip), 8, L] int64; with flip, row 2i is image i and 2i+1 its mirror."""
    device = next(model.parameters()).device
    images = images.to(device, non_blocking=True)
    if flip:
        images = torch.stack([images, images.flip(-1)], dim=1).flatten(0, 1)
    with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        return model.img_to_idx(images)


class _Stream:
    """Front-to-back reading of an iterable source (shards) shared by all chunks of one run, so each
    sample is decoded once however many chunks there are (chunks must be asked for in increasing order)."""

    def __init__(self, dataset):
        self.iterator, self.position = iter(dataset), 0

    def take(self, start: int, stop: int) -> Iterator[Dict[str, Any]]:
        if start < self.position:
            raise RuntimeError(f"stream at {self.position} cannot go back to {start}")
        for _ in range(start - self.position):  # samples of chunks that are done or belong to other ranks
            next(self.iterator)
        self.position = start
        while self.position < stop:
            self.position += 1
            yield next(self.iterator)


def _batches(source: ImageSource, start: int, stop: int, batch_size: int, num_workers: int,
             stream: Optional[_Stream] = None) -> Iterator[Dict[str, Any]]:
    if source.iterable:
        buffer: List[Dict[str, Any]] = []
        for sample in stream.take(start, stop):
            buffer.append(sample)
            if len(buffer) == batch_size:
                yield _collate(buffer)
                buffer = []
        if buffer:
            yield _collate(buffer)
        return
    loader = DataLoader(Subset(source.dataset, range(start, stop)), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=_collate)
    yield from loader


def _write_chunk(chunk_dir: Path, name: str, ids: np.ndarray, rows: List[Dict[str, Any]]) -> None:
    atomic_write(chunk_dir / f"{name}.npy", lambda f: np.save(f, ids))
    # The JSON is written second: a chunk counts as done only when both exist.
    _write_json(chunk_dir / f"{name}.json", {"rows": rows})


def _chunk_done(chunk_dir: Path, name: str) -> bool:
    return (chunk_dir / f"{name}.npy").is_file() and (chunk_dir / f"{name}.json").is_file()


def write_token_cache(model: torch.nn.Module, source: ImageSource, out_dir: PathLike, *, img_size: int,
                      batch_size: int = 32, chunk_size: int = 1024, flip: bool = False,
                      label_names: Optional[Sequence[str]] = None, amp_dtype: Optional[torch.dtype] = None,
                      num_workers: int = 0, progress: bool = True, tokenizer_source: str = "",
                      rank: int = 0, world_size: int = 1, barrier: Optional[Callable[[], None]] = None) -> Path:
    """Tokenize every image of ``source`` into a token cache folder (see module docstring).

    Args:
        model: a MedITok tokenizer (eval mode) on the device to run on.
        source: from :func:`csv_source`, :func:`folder_source`, :func:`medmnist_source` or :func:`shards_source`.
        img_size: side the images were resized to (recorded; must be a multiple of 16).
        batch_size: images per tokenizer call. chunk_size: images per resumable chunk.
        flip: also store each image's horizontal mirror (rows 2i, 2i+1), as LlamaGen's caching does.
        label_names: the label vocabulary (e.g. the training cache's, for a validation cache); a value
            outside it is an error. Default: the sorted distinct values.
        amp_dtype: ``torch.bfloat16`` to run the encoder under autocast (GPU); the quantizer always
            runs in float32.
        rank, world_size, barrier: with several processes (torchrun) each rank tokenizes chunks
            ``rank, rank + world_size, ...``; rank 0 assembles after ``barrier()``.

    Returns:
        the cache folder. A finished cache with the same tokenizer and settings is returned as is.

    Raises:
        TokenCacheError: the folder holds a cache or chunks made with other settings or another tokenizer,
            or a label value is not in ``label_names``.
    """
    out = Path(out_dir)
    if len(source) == 0:
        raise TokenCacheError(f"{source.description}: no images to tokenize")
    names = resolve_label_names(source.labels, label_names, str(source.description.get("csv") or source.description))
    fingerprint = tokenizer_fingerprint(model)
    config = getattr(model, "config", None)
    grid = (img_size // 16, img_size // 16)
    plan = {"format": CACHE_FORMAT, "tokenizer_fingerprint": fingerprint,
            "tokenizer_preset": getattr(config, "preset", None),
            "codebook_size": int(getattr(config, "codebook_size", 4096)), "img_size": img_size, "grid": list(grid),
            "flip": flip, "num_images": len(source), "chunk_size": chunk_size, "label_names": names,
            "source": source.description}
    if _finished(out, plan):
        return out
    chunk_dir = out / CHUNKS_DIR
    if rank == 0:
        chunk_dir.mkdir(parents=True, exist_ok=True)
        plan_path = chunk_dir / PLAN_FILE
        if plan_path.is_file():
            _compare_plans(json.loads(plan_path.read_text()), plan, plan_path)
        else:
            _write_json(plan_path, plan)
    if barrier is not None:
        barrier()

    label_index = {name: i for i, name in enumerate(names)}
    num_chunks = -(-len(source) // chunk_size)
    mine = [c for c in range(num_chunks) if c % world_size == rank and not _chunk_done(chunk_dir, _chunk_name(c))]
    todo = sum(min(chunk_size, len(source) - c * chunk_size) for c in mine)
    from tqdm import tqdm

    bar = tqdm(total=todo, unit="img", desc=f"tokenizing → {out.name}", disable=not progress or rank != 0)
    stream = _Stream(source.dataset) if source.iterable and mine else None
    for chunk in mine:
        start, stop = chunk * chunk_size, min(len(source), (chunk + 1) * chunk_size)
        ids_parts, rows = [], []
        offset = start
        for batch in _batches(source, start, stop, batch_size, num_workers, stream):
            ids_parts.append(_tokenize(model, batch["image"], flip, amp_dtype).to("cpu", torch.int32).numpy())
            for j, (caption, identifier) in enumerate(zip(batch["caption"], batch["identifier"])):
                label = source.labels[offset + j]
                for augmentation in (("none", "hflip") if flip else ("none",)):
                    rows.append({"label": label_index[label], "label_name": label,
                                 "modality": source.modalities[offset + j], "caption": caption,
                                 "identifier": identifier, "augmentation": augmentation})
            offset += len(batch["caption"])
            bar.update(len(batch["caption"]))
        if offset != stop:
            raise TokenCacheError(f"{source.description}: expected images {start}..{stop - 1}, the source gave "
                                  f"{offset - start}; it changed while being read")
        _write_chunk(chunk_dir, _chunk_name(chunk), np.concatenate(ids_parts).astype(np.uint16), rows)
    bar.close()
    if barrier is not None:
        barrier()
    if rank == 0:
        _assemble(out, plan, num_chunks, tokenizer_source)
    if barrier is not None:
        barrier()
    return out


def _finished(out: Path, plan: Dict[str, Any]) -> bool:
    """True when ``out`` already holds this exact cache; raises when it holds a different one."""
    manifest_path = out / MANIFEST_FILE
    if not manifest_path.is_file():
        return False
    manifest = json.loads(manifest_path.read_text())
    _compare_plans({k: manifest.get(k) for k in plan}, plan, manifest_path, finished=True)
    return True


def _compare_plans(old: Dict[str, Any], new: Dict[str, Any], path: Path, finished: bool = False) -> None:
    differing = [k for k in new if old.get(k) != new[k]]
    if not differing:
        return
    what = "a finished cache" if finished else "unfinished chunks"
    details = "; ".join(f"{k}: {_describe(old.get(k))} there vs {_describe(new[k])} now" for k in differing)
    raise TokenCacheError(f"{path}: the folder holds {what} made with other settings ({details}); "
                          f"write to a new --out folder or delete {path.parent}")


def _describe(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _assemble(out: Path, plan: Dict[str, Any], num_chunks: int, tokenizer_source: str) -> None:
    """Concatenate the chunks into ids.npy + meta.csv, write manifest.json last, remove the chunks."""
    chunk_dir = out / CHUNKS_DIR
    parts = [np.load(chunk_dir / f"{_chunk_name(c)}.npy", mmap_mode="r") for c in range(num_chunks)]
    rows = [row for c in range(num_chunks) for row in json.loads((chunk_dir / f"{_chunk_name(c)}.json").read_text())["rows"]]
    total = sum(len(p) for p in parts)
    if total != len(rows):
        raise TokenCacheError(f"{chunk_dir}: chunks hold {total} id rows but {len(rows)} metadata rows; delete the folder and rerun")

    def write_ids(tmp: str) -> None:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint16, shape=(total,) + parts[0].shape[1:])
        position = 0
        for part in parts:
            array[position:position + len(part)] = part
            position += len(part)
        array.flush()
        del array

    atomic_write_via_path(out / IDS_FILE, write_ids)

    def write_meta(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(META_COLUMNS))
            writer.writeheader()
            for i, row in enumerate(rows):
                writer.writerow({"row": i, **row})

    atomic_write_via_path(out / META_FILE, write_meta)
    counts = Counter(row["label_name"] for row in rows)
    manifest = {**plan, "num_rows": total, "ids_shape": [total] + list(parts[0].shape[1:]), "ids_dtype": "uint16",
                "counts_per_label": {name: counts.get(name, 0) for name in plan["label_names"]},
                "tokenizer_source": tokenizer_source,
                "preprocessing": (f"meditok.data.read_image → resize short side to {plan['img_size']} (bilinear, "
                                  f"antialiased) → centre crop {plan['img_size']}² → [-1, 1]"
                                  + ("; each image also stored horizontally flipped" if plan["flip"] else ""))}
    _write_json(out / MANIFEST_FILE, manifest)
    shutil.rmtree(chunk_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Reading

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
                f"token caches from different tokenizers: {first.path} has tokenizer {_short(first.fingerprint)} "
                f"({first.manifest.get('tokenizer_source') or first.manifest.get('tokenizer_preset')}), {other.path} has "
                f"{_short(other.fingerprint)} ({other.manifest.get('tokenizer_source') or other.manifest.get('tokenizer_preset')}); "
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
