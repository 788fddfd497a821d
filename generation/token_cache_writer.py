"""Writing token caches: :func:`write_token_cache` tokenizes an image source chunk by chunk (resumable,
several ranks) and assembles ids.npy + meta.csv + manifest.json. The folder layout is described in
:mod:`generation.token_cache`; the sources are :mod:`meditok.data.sources`.

The steps, each a function below: the plan (every setting the cache depends on) → an already finished
cache is returned as is (:func:`_finished`) → the chunk folder, with the plan a resumed run must match
(:func:`_prepare_chunks`) → this rank's missing chunks tokenized and written (:func:`_tokenize_chunks`) →
rank 0 concatenates them (:func:`_assemble`).
"""
from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from meditok import atomic_write, atomic_write_via_path

from .token_cache_format import (CACHE_FORMAT, CHUNKS_DIR, IDS_FILE, MANIFEST_FILE, META_COLUMNS, META_FILE,
                                 PLAN_FILE, PathLike, TokenCacheError, resolve_label_names, tokenizer_fingerprint)

if TYPE_CHECKING:
    from meditok.data.sources import ImageSource

Barrier = Optional[Callable[[], None]]


def write_token_cache(model: torch.nn.Module, source: "ImageSource", out_dir: PathLike, *, img_size: int,
                      batch_size: int = 32, chunk_size: int = 1024, flip: bool = False,
                      label_names: Optional[Sequence[str]] = None, amp_dtype: Optional[torch.dtype] = None,
                      num_workers: int = 0, progress: bool = True, tokenizer_source: str = "",
                      rank: int = 0, world_size: int = 1, barrier: Barrier = None) -> Path:
    """Tokenize every image of ``source`` into a token cache folder (see :mod:`generation.token_cache`).

    Args:
        model: a MedITok tokenizer (eval mode) on the device to run on.
        source: a :class:`meditok.data.ImageSource` (``meditok.data.open_source``: csv, folder, medmnist, shards).
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
    plan = _plan(model, source, img_size=img_size, chunk_size=chunk_size, flip=flip, label_names=label_names)
    if _finished(out, plan):
        return out
    chunk_dir = _prepare_chunks(out, plan, rank, barrier)
    num_chunks = -(-len(source) // chunk_size)
    mine = [c for c in range(num_chunks) if c % world_size == rank and not _chunk_done(chunk_dir, _chunk_name(c))]
    _tokenize_chunks(model, source, chunk_dir, mine, plan, batch_size=batch_size, num_workers=num_workers,
                     amp_dtype=amp_dtype, progress=progress and rank == 0, desc=f"tokenizing → {out.name}")
    _wait(barrier)
    if rank == 0:
        _assemble(out, plan, num_chunks, tokenizer_source)
    _wait(barrier)
    return out


# --------------------------------------------------------------------------------------------------
# The plan: every setting a cache depends on, compared on resume

def _plan(model: torch.nn.Module, source: "ImageSource", *, img_size: int, chunk_size: int, flip: bool,
          label_names: Optional[Sequence[str]]) -> Dict[str, Any]:
    if len(source) == 0:
        raise TokenCacheError(f"{source.description}: no images to tokenize")
    names = resolve_label_names(source.labels, label_names, str(source.description.get("csv") or source.description))
    fingerprint = tokenizer_fingerprint(model)
    config = getattr(model, "config", None)
    grid = (img_size // 16, img_size // 16)
    return {"format": CACHE_FORMAT, "tokenizer_fingerprint": fingerprint,
            "tokenizer_preset": getattr(config, "preset", None),
            "codebook_size": int(getattr(config, "codebook_size", 4096)), "img_size": img_size, "grid": list(grid),
            "flip": flip, "num_images": len(source), "chunk_size": chunk_size, "label_names": names,
            "source": source.description}


def _finished(out: Path, plan: Dict[str, Any]) -> bool:
    """True when ``out`` already holds this exact cache; raises when it holds a different one."""
    manifest_path = out / MANIFEST_FILE
    if not manifest_path.is_file():
        return False
    manifest = json.loads(manifest_path.read_text())
    _compare_plans({k: manifest.get(k) for k in plan}, plan, manifest_path, finished=True)
    return True


def _prepare_chunks(out: Path, plan: Dict[str, Any], rank: int, barrier: Barrier) -> Path:
    """The chunk folder; rank 0 creates it and writes the plan, or checks a resumed run's plan against it."""
    chunk_dir = out / CHUNKS_DIR
    if rank == 0:
        chunk_dir.mkdir(parents=True, exist_ok=True)
        plan_path = chunk_dir / PLAN_FILE
        if plan_path.is_file():
            _compare_plans(json.loads(plan_path.read_text()), plan, plan_path)
        else:
            _write_json(plan_path, plan)
    _wait(barrier)
    return chunk_dir


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


def _wait(barrier: Barrier) -> None:
    if barrier is not None:
        barrier()


# --------------------------------------------------------------------------------------------------
# Tokenizing chunks

def _tokenize_chunks(model: torch.nn.Module, source: "ImageSource", chunk_dir: Path, chunks: List[int],
                     plan: Dict[str, Any], *, batch_size: int, num_workers: int, amp_dtype: Optional[torch.dtype],
                     progress: bool, desc: str) -> None:
    """Tokenize and write the given chunks (in increasing order), with one progress bar over their images."""
    chunk_size, flip = plan["chunk_size"], plan["flip"]
    label_index = {name: i for i, name in enumerate(plan["label_names"])}
    todo = sum(min(chunk_size, len(source) - c * chunk_size) for c in chunks)
    from tqdm import tqdm

    bar = tqdm(total=todo, unit="img", desc=desc, disable=not progress)
    stream = _Stream(source.dataset) if source.iterable and chunks else None
    for chunk in chunks:
        start, stop = chunk * chunk_size, min(len(source), (chunk + 1) * chunk_size)
        ids, rows = _tokenize_chunk(model, source, start, stop, flip=flip, label_index=label_index,
                                    batch_size=batch_size, num_workers=num_workers, amp_dtype=amp_dtype,
                                    stream=stream, bar=bar)
        _write_chunk(chunk_dir, _chunk_name(chunk), ids, rows)
    bar.close()


def _tokenize_chunk(model: torch.nn.Module, source: "ImageSource", start: int, stop: int, *, flip: bool,
                    label_index: Dict[str, int], batch_size: int, num_workers: int,
                    amp_dtype: Optional[torch.dtype], stream: Optional["_Stream"],
                    bar) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
    """Images ``start..stop-1`` of the source → (ids uint16 [rows, 8, L], one metadata row per id row)."""
    ids_parts, rows = [], []
    offset = start
    for batch in _batches(source, start, stop, batch_size, num_workers, stream):
        ids_parts.append(_tokenize(model, batch["image"], flip, amp_dtype).to("cpu", torch.int32).numpy())
        rows.extend(_meta_rows(source, offset, batch, flip, label_index))
        offset += len(batch["caption"])
        bar.update(len(batch["caption"]))
    if offset != stop:
        raise TokenCacheError(f"{source.description}: expected images {start}..{stop - 1}, the source gave "
                              f"{offset - start}; it changed while being read")
    return np.concatenate(ids_parts).astype(np.uint16), rows


def _meta_rows(source: "ImageSource", offset: int, batch: Dict[str, Any], flip: bool,
               label_index: Dict[str, int]) -> List[Dict[str, Any]]:
    """The meta.csv rows (without ``row``) of a batch whose first image is image ``offset`` of the source."""
    rows = []
    for j, (caption, identifier) in enumerate(zip(batch["caption"], batch["identifier"])):
        label = source.labels[offset + j]
        for augmentation in (("none", "hflip") if flip else ("none",)):
            rows.append({"label": label_index[label], "label_name": label,
                         "modality": source.modalities[offset + j], "caption": caption,
                         "identifier": identifier, "augmentation": augmentation})
    return rows


@torch.inference_mode()
def _tokenize(model: torch.nn.Module, images: torch.Tensor, flip: bool, amp_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """[B, 3, S, S] → ids [B·(2 if flip), 8, L] int64; with flip, row 2i is image i and 2i+1 its mirror."""
    device = next(model.parameters()).device
    images = images.to(device, non_blocking=True)
    if flip:
        images = torch.stack([images, images.flip(-1)], dim=1).flatten(0, 1)
    with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        return model.img_to_idx(images)


def _collate(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    return {"image": torch.stack([s["image"] for s in samples]),
            "caption": [str(s.get("caption", "")) for s in samples],
            "identifier": [str(s.get("identifier", "")) for s in samples]}


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


def _batches(source: "ImageSource", start: int, stop: int, batch_size: int, num_workers: int,
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


# --------------------------------------------------------------------------------------------------
# Chunk files and the final assembly

def _chunk_name(index: int) -> str:
    return f"chunk-{index:06d}"


def _write_json(path: Path, payload: Dict[str, Any]) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(payload, indent=2) + "\n").encode()))


def _write_chunk(chunk_dir: Path, name: str, ids: np.ndarray, rows: List[Dict[str, Any]]) -> None:
    atomic_write(chunk_dir / f"{name}.npy", lambda f: np.save(f, ids))
    # The JSON is written second: a chunk counts as done only when both exist.
    _write_json(chunk_dir / f"{name}.json", {"rows": rows})


def _chunk_done(chunk_dir: Path, name: str) -> bool:
    return (chunk_dir / f"{name}.npy").is_file() and (chunk_dir / f"{name}.json").is_file()


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
