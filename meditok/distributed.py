"""torchrun process-group helpers shared by every trainer of the project (the tokenizer's, the generators',
the VQA model's): join the group when torchrun started the process (NCCL on GPU, gloo on CPU), rank queries,
a barrier and the clean-up. Without torchrun (WORLD_SIZE unset or 1) nothing is initialised and the queries
answer rank 0 of 1.

It lives in the library because the packages built on it (``generation``, ``interpretation``) depend on
``meditok`` only; the tokenizer's training code adds its collectives in ``utilities/dist.py``.
"""
from __future__ import annotations

import datetime
import os
from typing import Union

import torch
import torch.distributed as dist

#: how long a collective may wait for a slow rank (checkpoint writes, evaluation on rank 0) before failing
TIMEOUT = datetime.timedelta(minutes=30)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def init_distributed(device: Union[str, torch.device]) -> torch.device:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); returns this process's device.

    ``device``: 'cpu', 'cuda' or a torch.device of those kinds. Under torchrun each process takes GPU
    ``LOCAL_RANK``; a single process takes the GPU named ('cuda:1'), else GPU ``LOCAL_RANK`` (0)."""
    requested = torch.device(device)
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if requested.type == "cuda":
        index = local_rank() if several or requested.index is None else requested.index
        torch.cuda.set_device(index)
        requested = torch.device("cuda", index)
    if several and not is_initialized():
        dist.init_process_group(backend="nccl" if requested.type == "cuda" else "gloo", timeout=TIMEOUT)
    return requested


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()
