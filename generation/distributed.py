"""torchrun process-group helpers for the generation package.

Why not ``utilities/dist.py``: that module belongs to the tokenizer's training machinery, and this
package must depend only on ``meditok`` so a downstream user can take it alone. These few lines are
the part of it a generator needs: join the group when torchrun started us (NCCL on GPU, gloo on CPU),
rank queries, a barrier.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def init_distributed(device: str) -> torch.device:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); returns this process's device.

    ``device`` is 'cuda' or 'cpu'; on CUDA each process takes GPU ``LOCAL_RANK``.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    if device.startswith("cuda"):
        return torch.device("cuda", local_rank)
    return torch.device(device)


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()
