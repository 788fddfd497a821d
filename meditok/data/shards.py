"""Sharded streaming for corpora of millions of images: webdataset tar shards.

Layout written by :func:`write_shards` (CLI: ``scripts/data/csv_to_shards.py``)::

    out_dir/shard-000000.tar     samples 0..shard_size-1, each as
                                     <key>.<ext>   the original file's bytes (png, dcm, nii.gz, ...)
                                     <key>.json    {"identifier", "caption", "modality", "csv_line"}
    out_dir/shard-000001.tar ...
    out_dir/index.json           {"num_samples": N, "shards": [{"name", "num_samples"}], ...}

Storing the original bytes means a shard is decoded by the same :func:`read_image` as a file on
disk: no second decoding path to drift apart.
"""

from __future__ import annotations

import glob
import json
import random
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .errors import MedicalImageError
from .reading import CTWindowArg, read_image
from .samples import (
    BadSampleLog,
    build_sample,
    check_on_error,
    read_metadata_csv,
    resolve_identifier,
)
from ..seeding import distributed_rank_and_world_size, sample_seed, seeded_rngs, worker_seed
from .windows import DEFAULT_CT_WINDOW

INDEX_FILE = "index.json"
INDEX_FORMAT = "meditok-webdataset-shards-v1"


def _field_for(identifier: str) -> str:
    """Tar member extension for an image: its lower-case suffixes ('nii.gz', 'png')."""
    suffixes = "".join(Path(identifier).suffixes).lower().lstrip(".")
    # Extension-less files in medical archives are DICOM; the reader detects formats by content
    # anyway, the extension only helps a human listing the tar.
    return suffixes or "dcm"


def write_shards(
    csv_path: str | Path,
    out_dir: str | Path,
    root: str | Path | None = None,
    *,
    image_column: str = "identifier",
    caption_column: str = "caption",
    modality_column: str = "modality",
    sep: str = ",",
    shard_size: int = 1000,
    prefix: str = "shard",
    validate: bool = True,
    on_error: str = "raise",
    progress: bool = False,
    mtime: float | None = None,
) -> dict[str, Any]:
    """Convert a metadata CSV and its images into webdataset tar shards plus index.json.

    Args:
        csv_path, root, *_column, sep: as for :class:`CSVImageDataset`.
        out_dir: created if needed; existing shards with the same prefix are overwritten.
        shard_size: samples per shard (1000 images of ~100 kB give ~100 MB shards).
        validate: decode every image while converting, so bad files are found now rather than
            hours into training.
        on_error: 'raise' stops at the first bad image (MedicalImageError naming the file and the
            CSV line); 'skip' leaves it out and lists it in out_dir/bad_samples.csv.
        progress: show a tqdm progress bar.
        mtime: modification time stamped on every tar member; None (webdataset's default) uses the
            current time, a fixed value (e.g. 0) makes the shards byte-reproducible.

    Returns:
        the index dict (also written to out_dir/index.json), with "skipped" added.
    """
    import webdataset as wds
    from tqdm import tqdm

    check_on_error(on_error)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = read_metadata_csv(csv_path, [image_column, modality_column], [caption_column], sep)
    bad_samples = BadSampleLog(out_dir if on_error == "skip" else None)
    shards: list[dict[str, Any]] = []
    writer = None
    try:
        records = table.to_dict("records")
        for row, record in enumerate(
            tqdm(records, desc="writing shards", disable=not progress, unit="img")
        ):
            identifier, line = record[image_column], row + 2
            path = resolve_identifier(identifier, root)
            modality = record[modality_column]
            try:
                data = _read_bytes(path)
                if validate:
                    read_image(str(path), modality or None, data=data)
            except MedicalImageError as error:
                located = error.at_csv_line(csv_path, line)
                if on_error == "raise":
                    raise located from error
                bad_samples.record(str(csv_path), line, identifier, located)
                continue
            if writer is None or shards[-1]["num_samples"] >= shard_size:
                if writer is not None:
                    writer.close()
                    writer = None
                name = f"{prefix}-{len(shards):06d}.tar"
                writer = wds.TarWriter(str(out_dir / name), mtime=mtime)
                shards.append({"name": name, "num_samples": 0})
            writer.write(
                {
                    "__key__": f"{row:09d}",
                    _field_for(identifier): data,
                    "json": {
                        "identifier": identifier,
                        "caption": record.get(caption_column, ""),
                        "modality": modality,
                        "csv_line": line,
                    },
                }
            )
            shards[-1]["num_samples"] += 1
    finally:
        if writer is not None:
            writer.close()
    index = {
        "format": INDEX_FORMAT,
        "source_csv": str(csv_path),
        "num_samples": sum(s["num_samples"] for s in shards),
        "shards": shards,
    }
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return {**index, "skipped": bad_samples.count}


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MedicalImageError(
            path, "file not found", "check the path and the --root folder"
        ) from None
    except IsADirectoryError:
        raise MedicalImageError(
            path, "is a folder, not an image file", "point to an image file"
        ) from None
    if not data:
        raise MedicalImageError(path, "file is empty (0 bytes)", "copy or export the file again")
    return data


def resolve_shards(shards: str | Path | Iterable[str | Path]) -> tuple[list[str], int | None]:
    """Shard paths and the total sample count (None when unknown).

    Accepts a folder written by :func:`write_shards` (uses its index.json, else every *.tar),
    an index.json, a brace pattern ('data/shard-{000000..000009}.tar'), a glob, one .tar, or a
    list of paths.
    """
    from webdataset.shardlists import expand_urls

    if not isinstance(shards, (str, Path)):
        paths = [str(s) for s in shards]
        return paths, None
    source = Path(shards)
    if source.is_dir() and (source / INDEX_FILE).is_file():
        source = source / INDEX_FILE
    if source.is_file() and source.suffix == ".json":
        index = json.loads(source.read_text())
        return [str(source.parent / s["name"]) for s in index["shards"]], int(index["num_samples"])
    if source.is_dir():
        return sorted(str(p) for p in source.glob("*.tar")), None
    text = str(shards)
    if "{" in text:
        return expand_urls(text), None
    if any(ch in text for ch in "*?["):
        return sorted(glob.glob(text)), None
    return [text], None


class ShardedImageDataset(IterableDataset):
    """Stream samples from webdataset tar shards, split per rank and per DataLoader worker.

    Shards (not samples) are divided: rank r takes shards r, r + W, ... of the (per-epoch shuffled)
    list, and worker w of that rank takes every num_workers-th of those. Use at least
    world_size x num_workers shards, ideally many more, so every worker has data; a rank without
    any shard is an error. Ranks may receive different numbers of samples: with DDP, either stop
    each epoch after a fixed number of steps with ``repeat=True``, or keep shards equal in size.

    Args:
        shards: see :func:`resolve_shards`.
        transform, tokenizer, ct_window, on_error, error_log_dir: as for :class:`CSVImageDataset`
            (a skipped sample is left out; the stream moves on).
        shuffle: shuffle the shard order each epoch (same order on every rank) and samples within
            a buffer of `shuffle_buffer` per worker.
        seed: base seed of the shuffles; call :meth:`set_epoch` each epoch for a new order.
        rank, world_size: this process's place; None reads torch.distributed (0 and 1 if unused).
        repeat: loop over the shards forever, advancing the epoch at each pass.

    Yields dicts like :class:`CSVImageDataset` (``index`` is the CSV row the converter read) plus
    ``stream_position``: LongTensor [3] = (worker, epoch, samples of that epoch this worker has read,
    this one included).

    Exact resume: each sample is augmented under a seed of (seed, rank, worker, epoch, position), so
    its augmentation does not depend on what was loaded before it. A DataLoader takes each batch from
    one worker, in turn; :meth:`set_position` restarts every worker at the position recorded from the
    last batch it delivered (skipping samples without decoding them) and rotates the workers so that
    the one whose turn was next delivers first. :class:`StreamPosition` does that bookkeeping.
    """

    def __init__(
        self,
        shards: str | Path | Iterable[str | Path],
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        tokenizer: Callable[[str], torch.Tensor] | None = None,
        ct_window: CTWindowArg = DEFAULT_CT_WINDOW,
        *,
        shuffle: bool = False,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        repeat: bool = False,
        on_error: str = "raise",
        error_log_dir: str | Path | None = None,
    ):
        super().__init__()
        self.shard_paths, self.num_samples = resolve_shards(shards)
        if not self.shard_paths:
            raise ValueError(f"no shards found at {shards!r}")
        self.transform = transform
        self.tokenizer = tokenizer
        self.ct_window = ct_window
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.repeat = repeat
        self.on_error = check_on_error(on_error)
        self.bad_samples = BadSampleLog(error_log_dir if on_error == "skip" else None)
        self.epoch = 0
        self.start: dict[int, tuple[int, int]] = {}  # worker -> (epoch, samples already read)
        self.first_worker = 0

    def set_position(self, position: "StreamPosition") -> None:
        """Start the next iteration where ``position`` (recorded from the delivered batches) left off."""
        self.start = dict(position.workers)
        self.first_worker = position.next_worker

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch seeding the shuffles; call it before iterating, like DistributedSampler."""
        self.epoch = epoch

    @property
    def bad_sample_count(self) -> int:
        """Bad samples skipped in this process (with workers, sum ``bad_samples_skipped``)."""
        return self.bad_samples.count

    def _place(self) -> tuple[int, int, int, int]:
        rank, world_size = distributed_rank_and_world_size()
        rank = rank if self.rank is None else self.rank
        world_size = world_size if self.world_size is None else self.world_size
        info = get_worker_info()
        worker_id, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        # the DataLoader always asks worker 0 first; after a resume the worker whose turn it was goes first
        return rank, world_size, (worker_id + self.first_worker) % num_workers, num_workers

    def shards_for(
        self, rank: int, world_size: int, worker_id: int, num_workers: int, epoch: int
    ) -> list[str]:
        """The shards one worker of one rank reads in an epoch."""
        order = list(self.shard_paths)
        if self.shuffle:
            # Seeded by (seed, epoch) only, so every rank computes the same permutation and the
            # per-rank slices stay disjoint.
            permutation = np.random.default_rng([self.seed, epoch]).permutation(len(order))
            order = [order[i] for i in permutation]
        if len(order) < world_size:
            raise ValueError(
                f"{len(order)} shard(s) cannot feed {world_size} ranks; write more shards "
                "(a smaller --shard-size in scripts/data/csv_to_shards.py)"
            )
        return order[rank::world_size][worker_id::num_workers]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import webdataset as wds
        from webdataset.tariterators import tarfile_samples

        rank, world_size, worker_id, num_workers = self._place()
        epoch, skip = self.start.get(worker_id, (self.epoch, 0))
        while True:
            shards = self.shards_for(rank, world_size, worker_id, num_workers, epoch)
            handler = wds.reraise_exception if self.on_error == "raise" else wds.warn_and_continue
            samples = tarfile_samples(({"url": s} for s in shards), handler=handler)
            if self.shuffle:
                rng = random.Random(worker_seed(self.seed, rank, worker_id, epoch))
                samples = wds.shuffle(self.shuffle_buffer, min(100, self.shuffle_buffer), rng=rng)(
                    samples
                )
            skipped = 0
            for position, raw in enumerate(samples, start=1):
                if position <= skip:  # read before a resume: not decoded again
                    continue
                with seeded_rngs(sample_seed(self.seed, rank, worker_id, epoch, position)):
                    sample = self._decode(raw)
                if sample is None:
                    skipped += 1
                    continue
                # Carried by the next good sample, so a trainer summing it over batches counts
                # bad samples across DataLoader workers (each worker has its own counter).
                sample["bad_samples_skipped"], skipped = skipped, 0
                sample["stream_position"] = torch.tensor([worker_id, epoch, position])
                yield sample
            if not self.repeat or not shards:
                return
            epoch, skip = epoch + 1, 0

    def _decode(self, raw: dict[str, Any]) -> dict[str, Any] | None:
        key, url = raw["__key__"], raw.get("__url__", "?")
        fields = [k for k in raw if not k.startswith("__") and k != "json"]
        identifier = ""
        try:
            if "json" not in raw or len(fields) != 1:
                raise MedicalImageError(
                    f"{url}#{key}",
                    f"sample has fields {sorted(raw)}; expected one image and json",
                    "write shards with scripts/data/csv_to_shards.py",
                )
            meta = json.loads(raw["json"])
            identifier = meta["identifier"]
            # The name ends with the original file name, whose extension the reader may need.
            sample = build_sample(
                f"{url}#{identifier}",
                meta["modality"],
                meta.get("caption", ""),
                identifier,
                ct_window=self.ct_window,
                transform=self.transform,
                tokenizer=self.tokenizer,
                data=raw[fields[0]],
            )
        except MedicalImageError as error:
            if self.on_error == "raise":
                raise
            self.bad_samples.record(url, key, identifier, error)
            return None
        sample["index"] = int(meta.get("csv_line", 2)) - 2
        return sample


class StreamPosition:
    """Where a :class:`ShardedImageDataset` stream stands, from the batches a trainer has consumed.

    ``update(batch)`` after each batch taken from the DataLoader; ``state_dict()`` goes into a
    checkpoint, and ``dataset.set_position(StreamPosition.from_state(...))`` before the next
    ``iter(loader)`` continues with exactly the batches that would have come next.
    """

    def __init__(self, num_workers: int, epoch: int = 0):
        self.num_workers = max(1, num_workers)
        self.workers: dict[int, tuple[int, int]] = {w: (epoch, 0) for w in range(self.num_workers)}
        self.next_worker = 0

    def update(self, batch: dict[str, Any]) -> None:
        worker, epoch, position = (int(v) for v in batch["stream_position"][-1])
        self.workers[worker] = (epoch, position)
        self.next_worker = (worker + 1) % self.num_workers

    @property
    def epoch(self) -> int:
        """Passes over the shards every worker has completed (the epoch all of them have reached). Workers that
        have read nothing in their epoch (position 0: not started, or given no shard because the rank has fewer
        shards than workers) do not hold the count back, unless no worker has read anything yet."""
        reading = [epoch for epoch, position in self.workers.values() if position > 0]
        return min(reading) if reading else min(epoch for epoch, _ in self.workers.values())

    def state_dict(self) -> dict[str, Any]:
        return {"num_workers": self.num_workers, "next_worker": self.next_worker,
                "workers": [[w, e, p] for w, (e, p) in sorted(self.workers.items())]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "StreamPosition":
        position = cls(int(state["num_workers"]))
        position.workers = {int(w): (int(e), int(p)) for w, e, p in state["workers"]}
        position.next_worker = int(state["next_worker"])
        return position
