"""Attention projections around the quantizer (docs/method.md §1, UniTok's design).

``AttentionProjection(in_dim, out_dim, heads)``: x ↦ y = Linear(LN₃(x)) + CausalAttention(LN₁(x));
y ↦ y + GeGLU(LN₂(y)). The causal attention runs over the raster-ordered token sequence with heads of
width min(in_dim, out_dim):
  * down (1024 → 64): q, k, v have ``heads`` heads of 64 channels; the head outputs are averaged → 64;
  * up (64 → 1024): q, k, v are projected up to ``heads`` × 64 channels and concatenated → 1024.
The key bias is a fixed zero buffer (``zero_k_bias``), as in the released checkpoint.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vitamin import GeGluMlp


class CausalAttention(nn.Module):
    """[B, N, in_dim] → [B, N, out_dim]; causal multi-head attention whose heads are averaged (down) or
    concatenated (up) to reach ``out_dim``."""

    def __init__(self, in_dim: int, out_dim: int, num_heads: int):
        super().__init__()
        inner = max(in_dim, out_dim)  # q/k/v width
        if inner % num_heads:
            raise ValueError(f"attention width {inner} is not divisible by {num_heads} heads")
        self.in_dim, self.out_dim, self.num_heads = in_dim, out_dim, num_heads
        self.head_dim = inner // num_heads
        if in_dim > out_dim and self.head_dim != out_dim:
            raise ValueError(f"down-projection needs head width == out_dim ({self.head_dim} != {out_dim})")
        self.qkv = nn.Linear(in_dim, 3 * inner, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(inner))
        self.v_bias = nn.Parameter(torch.zeros(inner))
        self.register_buffer("zero_k_bias", torch.zeros(inner))
        self.proj = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, heads, N, head_dim]
        if self.in_dim > self.out_dim:
            x = x.mean(dim=1)  # average the heads down to out_dim
        else:
            x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        return self.proj(x)


class AttentionProjection(nn.Module):
    """[B, N, in_dim] → [B, N, out_dim]: linear skip + causal attention, then a residual GeGLU MLP."""

    def __init__(self, in_dim: int, out_dim: int, num_heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        if in_dim % out_dim and out_dim % in_dim:
            raise ValueError(f"in_dim={in_dim} and out_dim={out_dim} must divide one another")
        self.in_dim, self.out_dim = in_dim, out_dim
        self.norm1 = nn.LayerNorm(in_dim)  # eps 1e-5 here (torch default), as released
        self.attn = CausalAttention(in_dim, out_dim, num_heads)
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm3 = nn.LayerNorm(in_dim)
        self.norm2 = nn.LayerNorm(out_dim)
        # GeGluMlp applies its own LayerNorm (eps 1e-6) after norm2: the released model normalises twice.
        self.mlp = GeGluMlp(out_dim, int(out_dim * mlp_ratio), act_layer="gelu_tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.norm3(x)) + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))
