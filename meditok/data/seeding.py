"""Per-rank, per-worker seeding, so augmented data loading is reproducible.

Why not torch's default: a DataLoader seeds each worker's torch generator with
``loader_seed + worker_id``, where ``loader_seed`` is drawn from the main process's generator at
every ``iter(loader)``. Ranks that seed the main process identically (the usual
``torch.manual_seed(seed)``) would then augment identically on every rank, and numpy/random are
not seeded at all. Our worker init mixes in the rank and seeds all three libraries, while keeping
the per-epoch variation that ``loader_seed`` provides.

Usage::

    loader = DataLoader(dataset, num_workers=2, worker_init_fn=make_worker_init_fn(seed, rank))

With ``num_workers=0`` no worker exists; seed the main process with
``torch.manual_seed(worker_seed(seed, rank, 0, 0))`` instead.
"""

from __future__ import annotations

import random
from typing import Callable

import numpy as np
import torch


def distributed_rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def worker_seed(base_seed: int, rank: int, worker_id: int, loader_seed: int) -> int:
    """A 63-bit seed distinct for every (base seed, rank, worker, loader iteration).

    SeedSequence hashes the tuple, so nearby inputs (rank 1 worker 0 vs rank 0 worker 1) give
    unrelated streams, unlike ``base + rank + worker``.
    """
    entropy = [base_seed % 2**63, rank, worker_id, loader_seed % 2**63]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_everything_in_this_process(seed: int) -> None:
    """Seed torch, numpy and random from one integer."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def make_worker_init_fn(base_seed: int, rank: int | None = None) -> Callable[[int], None]:
    """A DataLoader ``worker_init_fn`` seeding each worker from (base_seed, rank, worker id).

    Args:
        base_seed: the run's seed.
        rank: this process's rank; None reads it from torch.distributed (0 if not initialised).
    """
    if rank is None:
        rank = distributed_rank_and_world_size()[0]

    def init_worker(worker_id: int) -> None:
        # torch.initial_seed() in a worker is loader_seed + worker_id: new at every epoch,
        # reproducible given the main process's seed.
        seed_everything_in_this_process(
            worker_seed(base_seed, rank, worker_id, torch.initial_seed())
        )

    return init_worker


def seed_worker(worker_id: int) -> None:
    """Ready-made ``worker_init_fn``: base seed 0, rank from torch.distributed.

    Reproducible as long as the main process is seeded; use :func:`make_worker_init_fn` to tie
    augmentation to an explicit run seed.
    """
    rank = distributed_rank_and_world_size()[0]
    seed_everything_in_this_process(worker_seed(0, rank, worker_id, torch.initial_seed()))
