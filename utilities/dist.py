"""Distributed helpers of the tokenizer's training: the torchrun set-up and rank queries of
``meditok.distributed`` (re-exported here), an all-gather that keeps the gradient of the local shard (for the
global-batch contrastive loss), and the small collectives of logging and checkpointing."""
from __future__ import annotations

from typing import Any, List

import torch
import torch.distributed as dist

from meditok.distributed import (barrier, cleanup, init_distributed, is_initialized, is_main, local_rank, rank,
                                 world_size)

__all__ = ["barrier", "cleanup", "init_distributed", "is_initialized", "is_main", "local_rank", "rank", "world_size",
           "all_gather_with_grad", "all_reduce_mean", "all_gather_objects", "broadcast_from_main"]


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
