"""Transforms and seeding: docs/method.md §3 probabilities, shapes and ranges, reproducibility."""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from meditok.data import (
    RandomCTWindow,
    RandomQuarterTurn,
    eval_transform,
    make_worker_init_fn,
    stage1_augmentation,
)

# docs/method.md §3: a random window with p = 0.5, drawn with these probabilities; otherwise 'common'.
SPEC_WINDOW_P = {"full": 0.2, "common": 0.3, "soft_tissue": 0.3, "lung": 0.15, "bone": 0.05}
SPEC_WINDOW_HU = {
    "full": (-1000, 2000),
    "common": (-1000, 1000),
    "soft_tissue": (-150, 250),
    "lung": (-1400, 200),
    "bone": (-500, 1300),
}


def within(frequency: float, probability: float, draws: int, sigmas: float = 5.0) -> bool:
    return abs(frequency - probability) <= sigmas * math.sqrt(
        probability * (1 - probability) / draws
    )


def test_ct_window_draws_match_spec_probabilities():
    augment = RandomCTWindow()
    generator = torch.Generator().manual_seed(1234)
    draws = 20000
    names = [augment.sample_window(generator) for _ in range(draws)]
    for name, p in SPEC_WINDOW_P.items():
        expected = 0.5 * p + (0.5 if name == "common" else 0.0)
        frequency = names.count(name) / draws
        assert within(frequency, expected, draws), (name, frequency, expected)
    assert set(names) == set(SPEC_WINDOW_P)


def test_ct_window_augmentation_applies_the_drawn_window():
    hu = torch.linspace(-1600, 2200, 64).reshape(1, 8, 8)
    augment = RandomCTWindow()
    seen = set()
    for seed in range(40):
        torch.manual_seed(seed)
        name = augment.sample_window()
        torch.manual_seed(seed)
        image = augment(hu)
        low, high = SPEC_WINDOW_HU[name]
        expected = np.clip((hu.numpy() - low) / (high - low) * 2 - 1, -1, 1)
        assert image.shape == (3, 8, 8)
        for channel in image:
            np.testing.assert_allclose(channel.numpy(), expected[0], atol=1e-6)
        seen.add(name)
    assert len(seen) >= 3  # the draws really vary


def test_quarter_turn_probability_and_directions():
    image = torch.arange(6.0).reshape(1, 2, 3)
    turn = RandomQuarterTurn()
    torch.manual_seed(0)
    outcomes = {"none": 0, "left": 0, "right": 0}
    draws = 4000
    for _ in range(draws):
        out = turn(image)
        if out.shape == image.shape:
            assert torch.equal(out, image)
            outcomes["none"] += 1
        elif torch.equal(out, torch.rot90(image, 1, (1, 2))):
            outcomes["left"] += 1
        else:
            assert torch.equal(out, torch.rot90(image, -1, (1, 2)))
            outcomes["right"] += 1
    assert within(outcomes["none"] / draws, 0.5, draws)
    assert within(outcomes["left"] / draws, 0.25, draws)


def test_stage1_augmentation_shapes_range_and_grayscale_rate():
    torch.manual_seed(0)
    augment = stage1_augmentation(16)
    # distinct colours so a grayscale conversion is detectable
    image = torch.stack(
        [torch.full((20, 24), -0.8), torch.full((20, 24), 0.1), torch.full((20, 24), 0.9)]
    )
    image[:, :10] *= -1
    draws = 2000
    gray = 0
    for _ in range(draws):
        out = augment(image)
        assert out.shape == (3, 16, 16)
        assert out.min() >= -1 and out.max() <= 1
        gray += bool(torch.allclose(out[0], out[1]) and torch.allclose(out[1], out[2]))
    assert within(gray / draws, 0.1, draws)


def test_stage1_augmentation_uses_the_released_settings():
    steps = stage1_augmentation(256).transforms
    crop = next(s for s in steps if isinstance(s, v2.RandomResizedCrop))
    assert crop.size == (256, 256) and tuple(crop.scale) == (0.9, 1.0)
    assert next(s for s in steps if isinstance(s, v2.RandomHorizontalFlip)).p == 0.5
    assert next(s for s in steps if isinstance(s, v2.RandomVerticalFlip)).p == 0.5
    assert next(s for s in steps if isinstance(s, RandomQuarterTurn)).p == 0.5
    assert next(s for s in steps if isinstance(s, v2.RandomGrayscale)).p == 0.1


def test_eval_transform_resizes_and_centre_crops():
    square = torch.rand(3, 40, 40) * 2 - 1
    reference = torch.nn.functional.interpolate(
        square[None], size=(16, 16), mode="bilinear", antialias=True, align_corners=False
    )[0]
    torch.testing.assert_close(eval_transform(16)(square), reference, atol=1e-5, rtol=0)
    wide = torch.rand(3, 40, 80) * 2 - 1
    resized = torch.nn.functional.interpolate(
        wide[None], size=(16, 32), mode="bilinear", antialias=True, align_corners=False
    )[0]
    torch.testing.assert_close(eval_transform(16)(wide), resized[:, :, 8:24], atol=1e-5, rtol=0)


class RandomDraws(Dataset):
    """Each item: one draw from torch, numpy and random, i.e. what augmentations consume."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return torch.tensor([torch.rand(()).item(), np.random.rand(), random.random()])


def epoch_draws(loader: DataLoader) -> torch.Tensor:
    return torch.cat(list(loader))


def test_worker_seeding_is_reproducible_and_differs_per_rank_and_epoch():
    def run(rank: int, epochs: int = 2) -> list[torch.Tensor]:
        torch.manual_seed(7)  # the trainer's seed, identical on every rank
        loader = DataLoader(
            RandomDraws(),
            batch_size=4,
            num_workers=2,
            worker_init_fn=make_worker_init_fn(base_seed=7, rank=rank),
        )
        return [epoch_draws(loader) for _ in range(epochs)]

    first, again, other_rank = run(0), run(0), run(1)
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(first[0], other_rank[0])
    assert not torch.equal(first[0], first[1])
    # numpy and random are seeded too, and differently in the two workers
    assert len(torch.unique(first[0][:, 1])) == len(first[0])
    assert len(torch.unique(first[0][:, 2])) == len(first[0])
