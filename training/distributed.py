"""torchrun process-group helpers shared by every trainer of the project (the tokenizer's, the generators',
the VQA model's): join the group when torchrun started the process (NCCL on GPU, gloo on CPU), rank queries,
a barrier and the clean-up. Without torchrun (WORLD_SIZE unset or 1) nothing is initialised and the queries
answer rank 0 of 1.

The small collectives of logging and checkpointing (a mean over ranks, gathering per-rank states, rank 0's
decision on every rank) and the all-gather that keeps the gradient of the local shard (the tokenizer's
global-batch contrastive loss) are here too: every trainer uses them through ``training.Checkpointer``.
"""
from __future__ import annotations

import datetime
import os
from typing import Any, List, Union

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


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns each rank the summed gradient of its own shard.

    Every rank computes the same global loss from the gathered batch; the gradient reaching rank r's
    shard is the sum over ranks of d(loss_k)/d(shard_r), hence the all-reduce in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts: List[torch.Tensor] = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[b, ...] per rank → [world·b, ...] in rank order, differentiable w.r.t. the local shard.
    Identity when not distributed. All ranks must pass the same b."""
    if not is_initialized() or world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (for logging)."""
    if not is_initialized():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / world_size()


def all_gather_objects(obj: Any) -> List[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (pickled; for small states such as RNGs)."""
    if not is_initialized():
        return [obj]
    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled; for small decisions such as a path or an error message)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
