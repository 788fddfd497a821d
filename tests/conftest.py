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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_networks(tmp_path_factory):
    """Tiny random BiomedCLIP and DINO, written to disk by the project's own code and loaded back."""
    from local_openclip.tiny import make_tiny_biomedclip
    from tokenizer_training.discriminator import make_tiny_dino
    out = tmp_path_factory.mktemp("tiny")
    return {"biomedclip": str(make_tiny_biomedclip(out / "biomedclip")), "dino": str(make_tiny_dino(out / "dinov2"))}


@pytest.fixture
def train_argv(tiny_networks):
    """train.py flags for a tiny CPU run on the example set (every loss on), as a function of the run folder
    and overrides: ``train_argv(run_dir, max_steps=3, adv_weight=0)``."""
    def build(run_dir, **overrides):
        flags = {
            "stage": 1, "preset": "tiny", "img_size": 32, "batch_size": 4, "num_workers": 0, "device": "cpu",
            "train_csv": os.path.join(ROOT, "datasets/meta/examples_train.csv"),
            "train_root": os.path.join(ROOT, "datasets/examples"),
            "biomedclip": tiny_networks["biomedclip"], "dino": tiny_networks["dino"], "lpips_vgg": "random",
            "output_dir": str(run_dir), "log_every": 1, "vis_every": 0, "save_every": 100, "warmup_epochs": 0.2,
            "disc_start_epochs": 0.2, "disc_warmup_epochs": 0.2, "seed": 3,
        }
        flags.update(overrides)
        argv = []
        for k, v in flags.items():
            argv += [f"--{k.replace('_', '-')}", str(v)]
        return argv
    return build


@pytest.fixture
def deterministic():
    """Deterministic kernels for the test, switched off afterwards."""
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``):
    one thread is faster than two for them, and far faster on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Runs a trainer's `main` in a new process group, and sends SIGNAL to the whole group (as Slurm and systemd do)
# from inside its AT-th call of TARGET (a function of the trainer's module): the signal lands mid-step, at a
# known step, so the stop and the resume can be checked exactly.
_SIGNALLED_RUN = """
import importlib, os, signal, sys
module_name, target, at, sig, argv = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5:]
module = importlib.import_module(module_name)
real, calls = getattr(module, target), [0]
def wrapped(*args, **kwargs):
    calls[0] += 1
    if calls[0] == at:
        os.killpg(os.getpgrp(), getattr(signal, sig))
    return real(*args, **kwargs)
setattr(module, target, wrapped)
sys.exit(module.main(argv))
"""


@pytest.fixture
def run_signalled():
    """``run_signalled(module, target, at, "SIGTERM", argv)`` → the finished subprocess (stdout, stderr, returncode)."""
    import subprocess
    import sys

    def run(module, target, at, sig, argv, timeout=400):
        return subprocess.run([sys.executable, "-c", _SIGNALLED_RUN, module, target, str(at), sig, *map(str, argv)],
                              cwd=ROOT, start_new_session=True, capture_output=True, text=True, timeout=timeout)
    return run
