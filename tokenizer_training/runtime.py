"""Process-level setup of a tokenizer training run: device and process group, determinism, TF32. (Stop
requests, shared by every trainer, are ``training.stopping.StopRequests``.)"""
from __future__ import annotations

import os

import torch

from training import distributed as dist


def setup_runtime(args) -> torch.device:
    """Join the process group (torchrun), pick the device, set determinism and TF32; seed the networks'
    initialisation (the same on every rank: see ``Trainer`` for the per-rank training streams)."""
    kind = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = dist.init_distributed(kind)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    return device
