"""Shared fixtures: everything tiny, seeded and offline."""
import os

import pytest
import torch

# Never reach a model hub from tests, whatever the machine's network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_model():
    import meditok

    torch.manual_seed(0)
    return meditok.build_meditok("tiny").eval()


@pytest.fixture
def images():
    """[2, 3, 64, 64] in [-1, 1]: smooth patterns, so reconstructions and grads are well-behaved."""
    g = torch.Generator().manual_seed(1)
    base = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(base, size=(64, 64), mode="bilinear", align_corners=False)
