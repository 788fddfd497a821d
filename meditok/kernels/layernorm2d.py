"""LayerNorm over the channels of a channels-last map, optionally followed by GELU, in one Triton kernel.

timm's ``LayerNorm2d`` / ``LayerNormAct2d`` compute ``permute → layer_norm → permute (→ GELU)``: in eager mode
that is a normalisation kernel writing a float32 map (autocast runs LayerNorm in float32) and a GELU kernel
reading and writing it again. On an NHWC (channels-last) tensor each pixel's C channels are contiguous, so one
kernel can read the map once, normalise each C-vector in registers, apply GELU and write the result once, in
the dtype the next convolution will read (bf16 under autocast: that convolution would cast it anyway, so the
numbers it sees are the same). Inference only: with gradients required the eager modules run.

``TRITON_INTERPRET=1`` (set before this module is imported) runs the kernel in Triton's interpreter on CPU
tensors, which is how the tests check it.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton ships with CUDA builds of torch
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available(x: torch.Tensor) -> bool:
    """Whether the kernel can run on ``x`` [B, C, H, W]: Triton present, a CUDA tensor (or the CPU interpreter),
    channels-last strides (each pixel's channels contiguous)."""
    return (triton is not None and (x.is_cuda or INTERPRET) and x.dim() == 4
            and x.permute(0, 2, 3, 1).is_contiguous())


if triton is not None:
    @triton.jit
    def _layer_norm_rows(x_ptr, w_ptr, b_ptr, y_ptr, n_rows, n_cols, eps,
                         BLOCK_C: tl.constexpr, ROWS: tl.constexpr, GELU: tl.constexpr):
        rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        cols = tl.arange(0, BLOCK_C)
        col_ok = cols < n_cols
        mask = (rows[:, None] < n_rows) & col_ok[None, :]
        offsets = rows[:, None] * n_cols + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / n_cols
        centred = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = centred * rstd[:, None] * w[None, :] + b[None, :]
        if GELU:  # exact (erf) GELU, as nn.GELU()
            y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


def layer_norm_2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, gelu: bool = False,
                  out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """LayerNorm over dim 1 of a channels-last ``x`` [B, C, H, W] (any float dtype; statistics in float32), then
    exact GELU when ``gelu``. Returns [B, C, H, W] channels-last in ``out_dtype`` (default ``x.dtype``)."""
    if not available(x):
        raise ValueError(f"layer_norm_2d needs a channels-last CUDA tensor (or TRITON_INTERPRET=1), got "
                         f"{x.device} tensor with strides {x.stride()}")
    B, C, H, W = x.shape
    y = torch.empty_like(x, dtype=out_dtype or x.dtype, memory_format=torch.channels_last)
    n_rows = B * H * W
    block_c = triton.next_power_of_2(C)
    rows = max(1, min(16, 4096 // block_c))
    _layer_norm_rows[(triton.cdiv(n_rows, rows),)](x, weight, bias, y, n_rows, C, eps,
                                                   BLOCK_C=block_c, ROWS=rows, GELU=gelu)
    return y


def _fused_forward(module: nn.Module, eager_forward, gelu: bool):
    def forward(x: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad)
        if needs_grad or not available(x):
            return eager_forward(x)
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        return layer_norm_2d(x, module.weight, module.bias, module.eps, gelu=gelu, out_dtype=out_dtype)
    return forward


def install(model: nn.Module) -> int:
    """Route every timm ``LayerNorm2d`` and ``LayerNormAct2d`` (with exact GELU) of ``model`` through the fused
    kernel when it applies (inference, channels-last input, CUDA); their eager forward otherwise. In place
    (instance attributes: names and state dict unchanged); returns how many modules were routed."""
    from timm.layers import LayerNorm2d, LayerNormAct2d
    from timm.layers.activations import GELU as TimmGELU
    routed = 0
    for m in model.modules():
        if getattr(m, "_fused_norm", False):
            continue
        if isinstance(m, LayerNormAct2d):  # timm's MbConv pre-norms are LayerNormAct2d without activation
            # timm builds its own GELU module (F.gelu, exact) for act_layer="gelu"
            exact_gelu = (isinstance(m.act, nn.GELU) and m.act.approximate == "none") or isinstance(m.act, TimmGELU)
            if not (isinstance(m.drop, nn.Identity) and (exact_gelu or isinstance(m.act, nn.Identity))):
                continue
            gelu = exact_gelu
        elif isinstance(m, LayerNorm2d):
            gelu = False
        else:
            continue
        m.forward = _fused_forward(m, m.forward, gelu)
        m._fused_norm = True
        routed += 1
    return routed
