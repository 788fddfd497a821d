"""training.sampler.StepSampler: the rows of a step are a pure function of (seed, step), shared by every trainer
built on the tokens."""
import pytest
import torch

from training.sampler import StepSampler


def reference_rows(size, global_batch, seed, step):
    """Written out from the documented rule: epoch permutations cut into full global batches."""
    per_epoch = size // global_batch
    epoch, within = divmod(step, per_epoch)
    perm = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    return perm[within * global_batch:(within + 1) * global_batch]


def test_rows_follow_the_documented_rule_and_ranks_split_the_global_batch():
    size, batch, world, seed, steps = 23, 3, 2, 7, 9
    ranks = [list(StepSampler(size, batch, seed, rank=r, world=world, steps=steps)) for r in range(world)]
    for step in range(steps):
        assert ranks[0][step] + ranks[1][step] == reference_rows(size, batch * world, seed, step)


def test_an_epoch_reads_each_row_at_most_once_and_drops_only_the_tail():
    sampler = StepSampler(23, 4, seed=1, steps=5)  # 5 steps of 4 = one epoch of 23 rows, tail of 3 dropped
    rows = [i for batch in sampler for i in batch]
    assert len(rows) == len(set(rows)) == 20
    assert sampler.epoch_of(4) == 0 and sampler.epoch_of(5) == 1


def test_a_resumed_sampler_reads_what_the_unbroken_one_reads():
    whole = list(StepSampler(50, 4, seed=3, steps=30))
    assert list(StepSampler(50, 4, seed=3, start_step=17, steps=30)) == whole[17:]
    assert len(StepSampler(50, 4, seed=3, start_step=17, steps=30)) == 13


def test_seeds_and_epochs_give_different_orders():
    a = StepSampler(40, 40, seed=0, steps=2)
    assert a.indices_for_step(0) != a.indices_for_step(1)
    assert a.indices_for_step(0) != StepSampler(40, 40, seed=1, steps=1).indices_for_step(0)


def test_fewer_rows_than_one_step_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one step's batch.*lower --batch-size"):
        StepSampler(5, 4, seed=0, rank=0, world=2)
