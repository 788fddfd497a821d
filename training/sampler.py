"""The one step-indexed sampler of every trainer built on the tokens (AR, diffusion, VQA): which dataset rows
each optimiser step reads is a pure function of (seed, step), so a resumed run reads exactly what an unbroken
run would have read, and N processes with per-process batch b read what one process with batch N·b reads.

The stream: epoch ``e`` is a permutation of the dataset seeded by (seed, e) — ``torch.randperm`` under
``torch.Generator().manual_seed(seed * 1_000_003 + e)`` — cut into full global batches (the tail that does not
fill one is dropped, so every step has the same batch size); step ``s`` is global batch ``s mod steps_per_epoch``
of epoch ``s // steps_per_epoch``; rank ``r`` of ``world`` takes the contiguous slice ``[r·b, (r+1)·b)`` of it
(``b`` = the per-rank batch). Nothing but the step is needed to resume: no sampler state goes into checkpoints.

    sampler = StepSampler(len(dataset), batch_size=8, seed=0, rank=rank, world=world, start_step=start, steps=total)
    loader = DataLoader(dataset, batch_sampler=sampler, ...)
"""
from __future__ import annotations

from typing import Dict, Iterator, List

import torch
from torch.utils.data import Sampler

SEED_STRIDE = 1_000_003  # epoch seeds seed·stride + e never collide for seeds and epochs below a million


class StepSampler(Sampler):
    """Batches of dataset indices, one per step in ``[start_step, steps)``, for ``rank`` of ``world``."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start_step: int = 0,
                 steps: int = 0):
        if batch_size <= 0 or world <= 0 or not 0 <= rank < world:
            raise ValueError(f"batch size {batch_size}, rank {rank} of {world}: need batch ≥ 1 and 0 ≤ rank < world")
        global_batch = batch_size * world
        if size < global_batch:
            raise ValueError(f"{size} samples are fewer than one step's batch ({batch_size} per process × {world} "
                             f"process{'es' if world > 1 else ''} = {global_batch}); lower --batch-size or add data")
        self.size, self.batch, self.seed = size, batch_size, seed
        self.rank, self.world, self.start, self.steps = rank, world, start_step, steps
        self.global_batch = global_batch
        self.steps_per_epoch = size // global_batch
        self._perms: Dict[int, torch.Tensor] = {}

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 1:  # a step reads one epoch; keep the current and the previous one
                self._perms.pop(min(self._perms))
            generator = torch.Generator().manual_seed(self.seed * SEED_STRIDE + epoch)
            self._perms[epoch] = torch.randperm(self.size, generator=generator)
        return self._perms[epoch]

    def global_indices(self, step: int) -> List[int]:
        """The rows of every rank at ``step`` (rank r's are the r-th slice of ``batch_size``)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        first = within * self.global_batch
        return self._perm(epoch)[first:first + self.global_batch].tolist()

    def indices_for_step(self, step: int) -> List[int]:
        """This rank's rows at ``step``."""
        return self.global_indices(step)[self.rank * self.batch:(self.rank + 1) * self.batch]

    def __iter__(self) -> Iterator[List[int]]:
        for step in range(self.start, self.steps):
            yield self.indices_for_step(step)

    def __len__(self) -> int:
        return max(0, self.steps - self.start)
