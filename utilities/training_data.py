"""Training data loaders with exactly resumable order and augmentation.

Exact resume needs two things: the same sample order (a per-epoch permutation seeded by
(seed, epoch), sharded per rank, with the already-consumed batches skipped on resume) and the same
random augmentation of each sample wherever and whenever it is loaded. The second is why
``PerSampleSeeded`` reseeds the RNGs from (seed, epoch, index) before each sample: the result does not
depend on which DataLoader worker loads it or on what that worker did before.
"""
from __future__ import annotations

import random
from typing import Any, Dict, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class PerSampleSeeded(Dataset):
    """Wraps a map-style dataset; sample i of epoch e is produced under RNG seed f(seed, e, i)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        seed = (self.seed * 1_000_003 + self.epoch * 7_919 + index) % (2 ** 63)
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % (2 ** 32))
        return self.dataset[index]


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler (per-epoch seeded shuffle, per-rank shards) that can start mid-epoch:
    ``set_start(k)`` skips the first k samples of this rank's share for the current epoch only."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True,
                 drop_last: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start = self.start, 0  # only the resumed epoch starts late
        return iter(indices[start:])


def build_loader(dataset: Dataset, batch_size: int, num_workers: int, seed: int, rank: int, world_size: int,
                 device_type: str) -> DataLoader:
    sampler = ResumableDistributedSampler(dataset, num_replicas=world_size, rank=rank, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=True, pin_memory=device_type == "cuda",
                      persistent_workers=False,  # workers must see each epoch's set_epoch()
                      prefetch_factor=4 if num_workers > 0 else None)


def steps_per_epoch(loader: DataLoader, grad_accum: int) -> int:
    """Optimiser steps in one epoch (a partial accumulation at the end of an epoch is dropped)."""
    return len(loader) // grad_accum


def set_loader_position(loader: DataLoader, epoch: int, batches_done: int) -> None:
    """Position ``loader`` at (epoch, batch) for the next iteration."""
    loader.sampler.set_epoch(epoch)
    loader.sampler.set_start(batches_done * loader.batch_size)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
