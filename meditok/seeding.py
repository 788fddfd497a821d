"""Every seed and RNG state of the project in one place: per-rank / per-worker / per-sample seeds, and
the capture and restore of the RNG states a training checkpoint carries.

Per-rank, per-worker seeding, so augmented data loading is reproducible.

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

import contextlib
import random
from typing import Any, Callable, Dict, Iterator

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
    return sample_seed(base_seed, rank, worker_id, loader_seed)


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


def rank_seed(base_seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s own training stream (DiffAugment draws, crops of the discriminator, ...).

    Networks are initialised from ``base_seed`` on every rank (identical weights); each rank's training
    draws then come from this stream, so ranks augment differently, as one large batch would be.
    Rank 0 keeps ``base_seed`` itself."""
    return base_seed if rank == 0 else worker_seed(base_seed, rank, 0, 0)


def sample_seed(*keys: int) -> int:
    """A 63-bit seed for one sample from integers such as (run seed, epoch, index) or (run seed, rank,
    worker, epoch, position): the same sample gets the same augmentation wherever it is loaded."""
    entropy = [int(k) % 2**63 for k in keys]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed torch (CPU), numpy and random for the body, then put the caller's states back, so loading a
    sample in the training process itself (no DataLoader workers) does not move its RNG streams."""
    saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        seed_everything_in_this_process(seed)
        yield
    finally:
        torch.set_rng_state(saved[0])
        random.setstate(saved[1])
        np.random.set_state(saved[2])


def rng_state() -> Dict[str, Any]:
    """This process's RNG states (torch CPU, CUDA if in use, numpy, random) as tensors and plain
    containers, loadable with ``torch.load(weights_only=True)``."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": random.getstate()[0], "internal": list(random.getstate()[1]),
                   "gauss": random.getstate()[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
