"""Training data loaders with exactly resumable order and augmentation.

Exact resume needs two things: the same sample order (a per-epoch permutation seeded by
(seed, epoch), sharded per rank, with the already-consumed batches skipped on resume) and the same
random augmentation of each sample wherever and whenever it is loaded. The second is why
``PerSampleSeeded`` reseeds the RNGs from (seed, epoch, index) before each sample: the result does not
depend on which DataLoader worker loads it or on what that worker did before.

The epoch travels with each index (the sampler yields ``(epoch, index)`` pairs), so the workers can be
persistent: forked once, not once per epoch. Re-forking a process that holds the models costs a
copy-on-write fault on every page the training step writes, while that epoch's worker lives; on the
2-core CPU try-out (2 steps per epoch) that was 0.5 s of a 1.3 s step. Neither the sample loading nor
the DataLoader touches the training process's own RNG streams, so ``num_workers`` does not change a run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from meditok.seeding import seeded_rngs
from training.workers import ignore_stop_signals, shutdown_workers


class PerSampleSeeded(Dataset):
    """Wraps a map-style dataset; sample i of epoch e is produced under RNG seed f(seed, e, i).

    ``dataset[(e, i)]`` loads sample i of epoch e; ``dataset[i]`` uses the epoch of ``set_epoch``. The global
    RNGs (torch CPU, ``random``, numpy) are restored afterwards: loading in the main process
    (``num_workers=0``) must not change the draws of the training step.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        with seeded_rngs((self.seed * 1_000_003 + epoch * 7_919 + index) % (2 ** 63)):
            return self.dataset[index]


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler (per-epoch seeded shuffle, per-rank shards) that can start mid-epoch:
    ``set_start(k)`` skips the first k samples of this rank's share for the current epoch only.
    With ``with_epoch`` it yields ``(epoch, index)`` pairs (for ``PerSampleSeeded``)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True,
                 drop_last: bool = True, with_epoch: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0
        self.with_epoch = with_epoch

    def set_start(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start = self.start, 0  # only the resumed epoch starts late
        if self.with_epoch:
            return iter([(self.epoch, i) for i in indices[start:]])
        return iter(indices[start:])


def build_loader(dataset: Dataset, batch_size: int, num_workers: int, seed: int, rank: int, world_size: int,
                 device_type: str) -> DataLoader:
    seeded = isinstance(dataset, PerSampleSeeded)
    sampler = ResumableDistributedSampler(dataset, num_replicas=world_size, rank=rank, seed=seed, with_epoch=seeded)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=True, pin_memory=device_type == "cuda",
                      # the epoch comes with each index, so workers live for the whole run (see module doc)
                      persistent_workers=seeded and num_workers > 0,
                      prefetch_factor=4 if num_workers > 0 else None,
                      # its own generator: otherwise each new iterator draws the workers' base seed from the
                      # global RNG (and a persistent iterator does not), so num_workers would change the run
                      generator=torch.Generator().manual_seed(seed), worker_init_fn=ignore_stop_signals)


def steps_per_epoch(loader: DataLoader, grad_accum: int) -> int:
    """Optimiser steps in one epoch (a partial accumulation at the end of an epoch is dropped)."""
    return len(loader) // grad_accum


def set_loader_position(loader: DataLoader, epoch: int, batches_done: int) -> None:
    """Position ``loader`` at (epoch, batch) for the next iteration."""
    loader.sampler.set_epoch(epoch)  # the sampler hands the epoch to PerSampleSeeded with each index
    loader.sampler.set_start(batches_done * loader.batch_size)


class TrainingData:
    """The training batches of one process, from a CSV (``CSVImageDataset``) or webdataset shards
    (``ShardedImageDataset``), with a position that a checkpoint stores and a resume restores exactly.

    ``next_batches(n)`` gives the n micro-batches of one optimiser step; ``state_dict()`` is the position
    after the last batches handed out (CSV: epoch and step within it; shards: every worker's place in its
    stream); ``epoch`` counts completed passes over the data (shards: the pass every worker has reached).
    """

    def __init__(self, args, img_size: int, text_tokenizer, run_dir: Path, rank: int, world: int,
                 device_type: str):
        self.args, self.img_size, self.world = args, img_size, world
        self.dataset = self._build_dataset(args, img_size, text_tokenizer, run_dir)
        self.sharded = bool(args.train_shards)
        self.bad_samples = 0
        self.first_images: Optional[torch.Tensor] = None  # shards: the grids show the stream's first images
        self.first_labels: List[str] = []
        if self.sharded:
            from meditok.data import StreamPosition
            self.loader = DataLoader(self.dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                                     drop_last=True, pin_memory=device_type == "cuda",
                                     persistent_workers=args.num_workers > 0, worker_init_fn=ignore_stop_signals,
                                     # its own generator: iter() must not draw from the training RNG
                                     generator=torch.Generator().manual_seed(args.seed))
            self.position = StreamPosition(args.num_workers)
            samples = args.samples_per_epoch or self.dataset.num_samples  # write_shards' index.json knows it
            if not args.max_steps and not samples:
                raise ValueError(f"{args.train_shards}: the number of samples is unknown (no index.json); pass "
                                 f"--samples-per-epoch or --max-steps")
            self.steps_per_epoch = max(1, (samples or 0) // (args.batch_size * world * args.grad_accum))
        else:
            self.loader = build_loader(self.dataset, args.batch_size, args.num_workers, args.seed, rank, world,
                                       device_type)
            self.steps_per_epoch = steps_per_epoch(self.loader, args.grad_accum)
            if self.steps_per_epoch == 0:
                raise ValueError(f"{args.train_csv}: {len(self.dataset)} images give no full batch of "
                                 f"{args.batch_size} × {world} ranks × {args.grad_accum} accumulation; lower "
                                 f"--batch-size")
            self._epoch, self.batch_in_epoch = 0, 0
        self._iterator: Optional[Iterator] = None

    @staticmethod
    def _build_dataset(args, img_size: int, text_tokenizer, run_dir: Path):
        from meditok.data import CSVImageDataset, RandomCTWindow, ShardedImageDataset, stage1_augmentation
        common = dict(transform=stage1_augmentation(img_size), tokenizer=text_tokenizer, ct_window=RandomCTWindow(),
                      on_error=args.on_bad_sample, error_log_dir=run_dir)
        if args.train_shards:
            return ShardedImageDataset(args.train_shards, shuffle=True, seed=args.seed, repeat=True, **common)
        dataset = CSVImageDataset(args.train_csv, root=args.train_root or None, image_column=args.image_column,
                                  caption_column=args.caption_column, modality_column=args.modality_column,
                                  sep=args.csv_sep, allow_outside_root=args.allow_outside_root, **common)
        return PerSampleSeeded(dataset, args.seed)

    # --- position ---------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.position.epoch if self.sharded else self._epoch

    def state_dict(self) -> Dict[str, Any]:
        if self.sharded:
            return {"kind": "shards", **self.position.state_dict()}
        return {"kind": "csv", "epoch": self._epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        kind = "shards" if self.sharded else "csv"
        if state.get("kind", "csv") != kind:
            raise ValueError(f"the checkpoint's data position is for {state.get('kind')} data, this run reads "
                             f"{kind}: resume with the same --train-csv / --train-shards")
        if self.sharded:
            from meditok.data import StreamPosition
            position = StreamPosition.from_state(state)
            if position.num_workers != self.position.num_workers:
                raise ValueError(f"the checkpoint was written with --num-workers {position.num_workers}; shard "
                                 f"streams resume exactly only with the same number, got {self.args.num_workers}")
            self.position = position
        else:
            self._epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        self._iterator = None

    def close(self) -> None:
        """End the loader's worker processes (they ignore SIGTERM: left to the interpreter's exit handler, they
        would be waited for forever); the next batch starts new ones."""
        shutdown_workers(self._iterator, self.loader)
        self._iterator = None

    # --- batches ----------------------------------------------------------------------------------
    def _start(self) -> Iterator:
        if self.sharded:
            self.dataset.set_position(self.position)
        else:
            set_loader_position(self.loader, self._epoch, self.batch_in_epoch * self.args.grad_accum)
        return iter(self.loader)

    def _next(self) -> Dict[str, Any]:
        if self._iterator is None:
            self._iterator = self._start()
        try:
            batch = next(self._iterator)
        except StopIteration:  # CSV only: shard streams repeat
            self._epoch, self.batch_in_epoch = self._epoch + 1, 0
            self._iterator = self._start()
            batch = next(self._iterator)
        if self.sharded:
            self.position.update(batch)
            if self.first_images is None:
                self.first_images = batch["image"][:6].clone()
                self.first_labels = [f"{Path(str(i)).stem} ({m})" for i, m in
                                     zip(batch.get("identifier", [""] * 6), batch.get("modality", [""] * 6))][:6]
        if "bad_samples_skipped" in batch:
            self.bad_samples += int(batch["bad_samples_skipped"].sum())
        return batch

    def next_batches(self, n: int) -> List[Dict[str, Any]]:
        """The ``n`` micro-batches of the next optimiser step (CSV: never spanning two epochs; the micro-batches
        left over at the end of an epoch are dropped, as ``steps_per_epoch`` counts)."""
        if not self.sharded and self.batch_in_epoch >= self.steps_per_epoch:
            self._epoch, self.batch_in_epoch = self._epoch + 1, 0
            self._iterator = None
        batches = [self._next() for _ in range(n)]
        if not self.sharded:
            self.batch_in_epoch += 1
        return batches

    def grid_images(self, n: int = 6) -> Optional[Tuple[torch.Tensor, List[str]]]:
        """Up to n images without augmentation for the reconstruction grids, one per modality first, and their
        row labels ("file (modality)"): from ``--vis-csv`` if set, else the training CSV; for shards without
        ``--vis-csv``, the stream's first batch (augmented; None until a batch was drawn)."""
        from meditok.data import CSVImageDataset, eval_transform
        csv = self.args.vis_csv or ("" if self.sharded else self.args.train_csv)
        if not csv:
            return (self.first_images, self.first_labels) if self.first_images is not None else None
        root = (self.args.vis_root if self.args.vis_csv else self.args.train_root) or None
        ds = CSVImageDataset(csv, root=root, transform=eval_transform(self.img_size), image_column=self.args.image_column,
                             caption_column=self.args.caption_column, modality_column=self.args.modality_column,
                             sep=self.args.csv_sep, on_error="skip", allow_outside_root=self.args.allow_outside_root)
        first_of_each = list({m: i for i, m in reversed(list(enumerate(ds.modalities)))}.values())[::-1]
        rows = (first_of_each + [i for i in range(len(ds)) if i not in first_of_each])[:n]
        samples = [ds[i] for i in rows]
        return (torch.stack([s["image"] for s in samples]),
                [f"{Path(str(s['identifier'])).stem} ({s['modality']})" for s in samples])
