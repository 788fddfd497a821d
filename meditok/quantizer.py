"""Multi-codebook vector quantizer (docs/method.md §1), all codebooks in one batched computation.

A latent of ``vocab_width`` channels (64) is cut into ``num_codebooks`` (8) chunks of
``codebook_dim`` (8) channels. Chunk k is ℓ2-normalised and replaced by the ℓ2-normalised entry of
codebook k with the highest cosine similarity. Per codebook the loss is
``β·‖sg[e] − z‖² + ‖e − sg[z]‖²`` (mean squared) and the codebook losses are averaged; because every
codebook sees the same number of elements that average equals one mean over all channels, which is
what we compute. Gradients pass to z with the straight-through estimator.

Storage: the codebooks live in one ``[K, V, D]`` parameter so the forward pass is a single batched
matmul/argmax/gather. The released checkpoint stores them per codebook
(``codebooks.{k}.codebook.weight`` [V, D] and ``codebooks.{k}.vocab_usage`` [V]); state-dict hooks
translate between the two layouts, so ``state_dict()`` has the released names and
``load_state_dict`` accepts them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def autocast_off(t: torch.Tensor):
    """Context that runs its body in full precision even inside an autocast region (no-op on meta)."""
    if t.device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=t.device.type, enabled=False)


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # [B, L, K*D] ℓ2-normalised codewords per chunk (straight-through to z)
    ids: torch.Tensor  # [B, K, L] int64, per-codebook indices in [0, V)
    loss: torch.Tensor  # scalar, β·commitment + codebook loss, averaged over codebooks
    usage: torch.Tensor  # scalar, % of codewords picked by > 0.01/V of this batch's tokens, mean over codebooks


class MultiCodebookQuantizer(nn.Module):
    """K independent codebooks of V entries × D dims, cosine-similarity assignment.

    Args:
        num_codebooks: K (8 in the released model).
        codebook_size: V entries per codebook (4096).
        codebook_dim: D channels per codebook (8); the latent has K·D channels.
        beta: commitment weight β (0.25).
        sync_usage: in training mode inside an initialised process group, all-reduce the per-code counts so
            ``usage`` and the ``vocab_usage`` EMA describe the global batch (the default, as the released
            training did). ``False`` keeps them per rank: no collective in the forward pass, so a rank may run
            the quantizer in training mode on its own (e.g. a rank-0-only check) without waiting for the others.
            A run-time switch (attribute of the same name), not part of the saved config.
    """

    def __init__(self, num_codebooks: int = 8, codebook_size: int = 4096, codebook_dim: int = 8, beta: float = 0.25,
                 sync_usage: bool = True):
        super().__init__()
        self.num_codebooks = num_codebooks
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.beta = beta
        self.sync_usage = sync_usage
        self.score_chunk: Optional[int] = None  # tokens scored at once (None: all); see _nearest
        self.weight = nn.Parameter(torch.empty(num_codebooks, codebook_size, codebook_dim))
        # Running estimate of how often each code is chosen (an EMA of per-batch frequencies), kept for
        # checkpoint compatibility and dead-code monitoring. Updated only in training mode.
        self.register_buffer("vocab_usage", torch.zeros(num_codebooks, codebook_size))
        self.usage_updates = 0
        self.reset_parameters()
        self.register_state_dict_post_hook(_split_codebooks_hook)
        self.register_load_state_dict_pre_hook(_stack_codebooks_hook)

    def reset_parameters(self) -> None:
        # Released init ("vocab_init" -1): uniform in ±D^-0.5/36; entries are normalised when used.
        bound = self.codebook_dim ** -0.5 / 36
        if not self.weight.is_meta:
            nn.init.uniform_(self.weight, -bound, bound)

    def extra_repr(self) -> str:
        return (f"num_codebooks={self.num_codebooks}, codebook_size={self.codebook_size}, "
                f"codebook_dim={self.codebook_dim}, beta={self.beta:g}, sync_usage={self.sync_usage}")

    def normalized_codebooks(self) -> torch.Tensor:
        """[K, V, D] ℓ2-normalised codewords, float32."""
        return F.normalize(self.weight.float(), dim=-1)

    def _chunks(self, z: torch.Tensor) -> torch.Tensor:
        """[B, L, K*D] → [K, B*L, D], ℓ2-normalised per chunk, float32."""
        B, L, C = z.shape
        if C != self.num_codebooks * self.codebook_dim:
            raise ValueError(f"quantizer expects {self.num_codebooks * self.codebook_dim} channels, got {C}")
        z = z.float().reshape(B * L, self.num_codebooks, self.codebook_dim).transpose(0, 1)
        return F.normalize(z, dim=-1)

    def _nearest(self, z_chunks: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
        # Cosine similarity of unit vectors: one batched matmul over codebooks, [K, N, V]. Always float32,
        # whatever autocast region the caller is in: with 4,096 codewords on the 8-d sphere the best and
        # second-best similarities are often closer than bf16's resolution (≈ 4e-3), and bf16 scores would
        # pick a different id for several % of the tokens (docs/performance.md, "bf16 numerics").
        #
        # ``score_chunk`` (tokens per piece, run-time attribute) scores the N tokens in pieces: the [K, N, V]
        # float32 score tensor (4.3 GB for 128 images of 256 tokens) is then never whole in memory, only
        # [K, chunk, V] at a time. Each token's scores are the same dot products either way, so ids are equal.
        z_chunks, codebooks = z_chunks.detach(), codebooks.detach().transpose(1, 2)
        with autocast_off(z_chunks):
            n, step = z_chunks.shape[1], self.score_chunk
            if not step or n <= step:
                return torch.bmm(z_chunks, codebooks).argmax(dim=-1)  # [K, N]; both float32 already
            return torch.cat([torch.bmm(z_chunks[:, i:i + step], codebooks).argmax(dim=-1)
                              for i in range(0, n, step)], dim=1)

    def _assign(self, z: torch.Tensor):
        """Nearest codewords of z [B, L, K*D] → (unit chunks [K, N, D], ids [K, N], codewords [K, N, D])."""
        z_chunks = self._chunks(z)
        codebooks = self.normalized_codebooks()  # [K, V, D]
        ids = self._nearest(z_chunks, codebooks)
        return z_chunks, ids, self._gather(codebooks, ids)

    @staticmethod
    def _gather(codebooks: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """codebooks [K, V, D], ids [K, N] → codewords [K, N, D] (differentiable w.r.t. the codebooks)."""
        return torch.gather(codebooks, 1, ids.unsqueeze(-1).expand(*ids.shape, codebooks.shape[-1]))

    def _to_latent(self, e: torch.Tensor, B: int, L: int) -> torch.Tensor:
        """[K, B*L, D] → [B, L, K*D]."""
        return e.transpose(0, 1).reshape(B, L, self.num_codebooks * self.codebook_dim)

    def _to_ids(self, ids: torch.Tensor, B: int, L: int) -> torch.Tensor:
        """[K, B*L] → [B, K, L]."""
        return ids.reshape(self.num_codebooks, B, L).transpose(0, 1)

    def f_to_idx(self, z: torch.Tensor) -> torch.Tensor:
        """Continuous latent [B, L, K*D] → ids [B, K, L] (int64)."""
        B, L, _ = z.shape
        return self._to_ids(self._nearest(self._chunks(z), self.normalized_codebooks()), B, L)

    def quantize(self, z: torch.Tensor):
        """Continuous latent [B, L, K*D] → (ids [B, K, L], quantized latent [B, L, K*D]); the inference path:
        equals ``idx_to_f(f_to_idx(z))`` without the id validation, no loss, no usage tracking."""
        B, L, _ = z.shape
        _, ids, e = self._assign(z)
        return self._to_ids(ids, B, L), self._to_latent(e, B, L)

    def idx_to_f(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, K, L] or [B, K, h, w] → quantized latent [B, L, K*D] (unit-norm chunks, float32)."""
        if ids.dim() < 3 or ids.shape[1] != self.num_codebooks:
            raise ValueError(f"token ids must have shape [B, {self.num_codebooks}, L] or [B, {self.num_codebooks}, h, w], "
                             f"got {tuple(ids.shape)}")
        ids = ids.flatten(2).long()
        B, K, L = ids.shape
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.codebook_size):
            raise ValueError(f"token ids must lie in [0, {self.codebook_size}), got range "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        e = self._gather(self.normalized_codebooks(), ids.transpose(0, 1).reshape(K, B * L))
        return self._to_latent(e, B, L)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z [B, L, K*D] (any float dtype; computed in float32) → QuantizerOutput."""
        B, L, _ = z.shape
        z_chunks, ids, e = self._assign(z)  # e carries the gradient to the codebooks
        loss = self.beta * F.mse_loss(z_chunks, e.detach()) + F.mse_loss(e, z_chunks.detach())
        quantized = z_chunks + (e - z_chunks).detach()  # straight-through estimator
        usage = self._track_usage(ids)
        return QuantizerOutput(self._to_latent(quantized, B, L), self._to_ids(ids, B, L), loss, usage)

    @torch.no_grad()
    def _track_usage(self, ids: torch.Tensor) -> torch.Tensor:
        K, V = self.num_codebooks, self.codebook_size
        offsets = torch.arange(K, device=ids.device).unsqueeze(1) * V
        flat = (ids + offsets).flatten()
        # scatter_add, not bincount: CUDA's bincount reads the largest id back to the host (a sync per step)
        counts = torch.zeros(K * V, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float))
        counts = counts.view(K, V)
        if self.training and self.sync_usage and dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)  # usage over the global batch
        freq = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
        usage = (freq > 0.01 / V).float().mean() * 100
        if self.training:
            # EMA schedule of the released code: copy, then momentum 0.9 for 100 steps, then 0.99.
            if self.usage_updates == 0:
                self.vocab_usage.copy_(freq)
            else:
                momentum = 0.9 if self.usage_updates < 100 else 0.99
                self.vocab_usage.mul_(momentum).add_(freq, alpha=1 - momentum)
            self.usage_updates += 1
        return usage


def _split_codebooks_hook(module: MultiCodebookQuantizer, state_dict: Dict[str, Any], prefix: str, local_metadata) -> None:
    weight = state_dict.pop(prefix + "weight")
    usage = state_dict.pop(prefix + "vocab_usage")
    for k in range(module.num_codebooks):
        # clone: saved tensors must not share storage (safetensors refuses shared tensors)
        state_dict[f"{prefix}codebooks.{k}.vocab_usage"] = usage[k].clone()
        state_dict[f"{prefix}codebooks.{k}.codebook.weight"] = weight[k].clone()


def _stack_codebooks_hook(module: MultiCodebookQuantizer, state_dict: Dict[str, Any], prefix: str, local_metadata,
                          strict, missing_keys: List[str], unexpected_keys: List[str], error_msgs: List[str]) -> None:
    """Accept the released per-codebook layout; leave anything incomplete for load_state_dict to report."""
    for name, target in (("codebook.weight", "weight"), ("vocab_usage", "vocab_usage")):
        keys = [f"{prefix}codebooks.{k}.{name}" for k in range(module.num_codebooks)]
        if prefix + target in state_dict or not all(k in state_dict for k in keys):
            continue
        parts = [state_dict[k] for k in keys]
        if len({tuple(p.shape) for p in parts}) != 1:
            error_msgs.append(f"codebook tensors {keys} have different shapes {[tuple(p.shape) for p in parts]}")
            continue
        for k in keys:
            del state_dict[k]
        state_dict[prefix + target] = torch.stack(parts)
