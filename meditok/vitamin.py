"""ViTamin hybrid encoder and its mirrored decoder (docs/method.md §1).

The encoder's building blocks are timm's own ViTamin pieces (``timm.models.vitamin``: conv stem,
pre-norm MbConv stages, strided-conv "pool" into the ViT width, GeGLU MLP) and timm's ViT ``Block``,
so the encoder computes exactly what the released model (a timm ViTamin) computes. Attribute names
reproduce the released checkpoint's parameter names (``patch_embed.backbone.stem.conv1.weight``, …).

The decoder's conv half (nearest-neighbour ×2 + 3×3 conv upsampling, inverse MbConv blocks,
inverse stem) has no counterpart in timm and is written here.

Shapes, for an input of H×W pixels (multiples of 16), width C = ``vit_width``:
encoder: [B, 3, H, W] in [-1, 1] → [B, H/16·W/16, C];  decoder: [B, h·w, C] → [B, 3, 16h, 16w].
"""
from __future__ import annotations

import inspect
from functools import partial
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d, LayerNormAct2d, make_divisible
from timm.models.vision_transformer import Block
from timm.models.vitamin import GeGluMlp, MbConvStages, VitCfg, VitConvCfg
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

ViTLayerNorm = partial(nn.LayerNorm, eps=1e-6)


def vit_blocks(width: int, depth: int, heads: int, mlp_ratio: float, drop_path: float = 0.0) -> nn.Sequential:
    """``depth`` pre-norm ViT blocks with ViTamin's GeGLU MLP (own LayerNorm, tanh-GELU, hidden 2×width)."""
    # stochastic depth rises linearly over the blocks (plain Python: also works under a meta-device context)
    rates = [drop_path * i / (depth - 1) for i in range(depth)] if depth > 1 else [drop_path] * depth
    return nn.Sequential(*[
        Block(width, heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=rates[i], norm_layer=ViTLayerNorm,
              act_layer="gelu_tanh", mlp_layer=GeGluMlp)
        for i in range(depth)
    ])


#: ops whose outputs selective checkpointing keeps: the weight matmuls, convolutions and fused attention kernels
#: (the costly FLOPs). Everything else inside a block (LayerNorm, GELU, the GeGLU product, residual adds,
#: copies) is memory-bound and cheap, so it is recomputed in the backward pass instead of being stored. Batched
#: matmuls (``bmm``) are not kept: outside the fused attention kernels they are the unfused attention's
#: [heads, L, L] score and probability maps, 4× a token map each at 256 tokens, cheaper to recompute than to keep.
_SAVED_OPS = tuple(getattr(torch.ops.aten, name).default for name in (
    "mm", "addmm", "convolution", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, name))


def save_matmuls_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective-checkpointing policy: keep matmul/conv/attention outputs, recompute the rest."""
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(save_matmuls_policy)


# Newer torch lets the tensors selective checkpointing keeps pass through saved-tensor hooks (how
# meditok.info counts stored activations); older versions keep them out of any hook.
_SAC_KWARGS = ({"respect_saved_tensors_hooks": True}
               if "respect_saved_tensors_hooks" in inspect.signature(checkpoint).parameters else {})


def run_checkpointed(module: nn.Module, x: torch.Tensor, mode) -> torch.Tensor:
    """``module(x)`` with activation checkpointing ``mode``: False/None (plain call), ``"full"`` (store only
    the input, recompute everything) or ``"selective"`` (store matmul/conv outputs, recompute the cheap ops)."""
    if not mode or not (torch.is_grad_enabled() and x.requires_grad):
        return module(x)
    if mode == "selective":
        return checkpoint(module, x, use_reentrant=False, context_fn=_selective_context, **_SAC_KWARGS)
    return checkpoint(module, x, use_reentrant=False)


def _run_blocks(blocks: nn.Sequential, x: torch.Tensor, grad_checkpointing) -> torch.Tensor:
    """``grad_checkpointing``: False, True (= "full") or "selective" (see ``run_checkpointed``)."""
    mode = "full" if grad_checkpointing is True else grad_checkpointing
    for block in blocks:
        x = run_checkpointed(block, x, mode)
    return x


class ConvPatchEmbed(nn.Module):
    """ViTamin's convolutional front: stem (/2) + two MbConv stages (/2 each) + strided conv (/2) to the ViT width.

    [B, 3, H, W] → [B, (H/16)·(W/16), C]. Kept as ``.backbone`` to match the released parameter names.
    """

    def __init__(self, stem_width: int, conv_widths: Sequence[int], conv_depths: Sequence[int], vit_width: int):
        super().__init__()
        cfg = VitCfg(
            embed_dim=(conv_widths[0], conv_widths[1], vit_width),
            depths=(conv_depths[0], conv_depths[1], 1),
            stem_width=stem_width,
            conv_cfg=VitConvCfg(norm_layer="layernorm2d", norm_eps=1e-6),
        )
        self.backbone = MbConvStages(cfg)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x = self.backbone(x)  # [B, C, h, w]
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid


class ViTaminEncoder(nn.Module):
    """[B, 3, H, W] in [-1, 1] → token features [B, H/16·W/16, vit_width] (after the final LayerNorm)."""

    def __init__(self, stem_width: int, conv_widths: Sequence[int], conv_depths: Sequence[int], vit_width: int,
                 vit_depth: int, vit_heads: int, mlp_ratio: float = 2.0, drop_path: float = 0.0):
        super().__init__()
        self.embed_dim = vit_width
        self.patch_embed = ConvPatchEmbed(stem_width, conv_widths, conv_depths, vit_width)
        # The released model has no positional embedding but stores a frozen all-zero [1, 1, C] one that is
        # added (broadcast) to every token; we keep it so released weights load strictly and act identically.
        self.pos_embed = nn.Parameter(torch.zeros(1, 1, vit_width), requires_grad=False)
        self.blocks = vit_blocks(vit_width, vit_depth, vit_heads, mlp_ratio, drop_path)
        self.norm = ViTLayerNorm(vit_width)
        self.grad_checkpointing = False  # False, True or "selective"
        self.channels_last = False  # MedITok.speed_up(channels_last=True): NHWC convolutions

    def forward(self, x: torch.Tensor, return_grid: bool = False):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x, grid = self.patch_embed(x)
        x = x + self.pos_embed
        x = _run_blocks(self.blocks, x, self.grad_checkpointing)
        x = self.norm(x)
        return (x, grid) if return_grid else x


class Upsample2d(nn.Module):
    """Nearest-neighbour ×2 then a 3×3 conv: [B, C_in, h, w] → [B, C_out, 2h, 2w].

    The parameters are those of the 3×3 conv (released names ``conv.weight``/``conv.bias``), but the forward
    pass never builds the ×2 nearest-neighbour image: a 3×3 conv over a nearest-upsampled map is exactly a
    stride-2 transposed conv with a 4×4 kernel over the small map, whose taps are sums of the 3×3 taps
    (``subpixel_kernel``). Each output pixel then reads 2×2 instead of 3×3 input values: 16/36 of the
    multiply-adds of these convs (most of the decoder's FLOPs; figures in docs/performance.md) and no
    4×-sized intermediate to store for the backward pass. ``direct=True`` (or the run-time attribute
    ``self.direct``, set by ``MedITok.speed_up(upsample="direct")``) runs the textbook form: more FLOPs, but
    a plain 3×3 convolution, for which cuDNN may have a faster engine than for the transposed one.
    """

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=1, padding=1)
        self.direct = False  # run-time choice of form only: parameters and state dict are the same

    def forward(self, x: torch.Tensor, direct: Optional[bool] = None) -> torch.Tensor:
        if self.direct if direct is None else direct:
            return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        return F.conv_transpose2d(x, subpixel_kernel(self.conv.weight), self.conv.bias, stride=2, padding=1)


def subpixel_kernel(weight: torch.Tensor) -> torch.Tensor:
    """3×3 conv weight [C_out, C_in, 3, 3] → the [C_in, C_out, 4, 4] transposed-conv weight (stride 2, padding
    1) that computes ``conv3x3(nearest_upsample_x2(x))`` directly from ``x``.

    Along one axis, output row 2i reads input rows i−1 (tap 0) and i (taps 1+2), output row 2i+1 reads rows i
    (taps 0+1) and i+1 (tap 2); a stride-2 transposed conv with padding 1 gives output row o the input rows i
    with kernel index k = o − 2i + 1, so its 4 taps are (w2, w1+w2, w0+w1, w0). Sums are formed in the
    weight's own dtype (fp32 for trained weights), before any autocast cast.
    """
    w0, w1, w2 = weight.unbind(dim=2)
    rows = torch.stack([w2, w1 + w2, w0 + w1, w0], dim=2)  # [C_out, C_in, 4, 3]
    c0, c1, c2 = rows.unbind(dim=3)
    return torch.stack([c2, c1 + c2, c0 + c1, c0], dim=3).transpose(0, 1)  # [C_in, C_out, 4, 4]


class InvMbConvBlock(nn.Module):
    """Inverse of ViTamin's MbConv block: pre-LayerNorm, 1×1 expand ×4, GELU, (upsample ×2), 3×3 depthwise,
    GELU, 1×1 project, plus a shortcut (upsampling conv when ``upsample``, 1×1 conv when widths differ)."""

    def __init__(self, in_chs: int, out_chs: int, upsample: bool = False, expand_ratio: float = 4.0):
        super().__init__()
        mid_chs = make_divisible(out_chs * expand_ratio)
        if upsample:
            self.shortcut = Upsample2d(in_chs, out_chs)
        elif in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1)
        else:
            self.shortcut = nn.Identity()
        self.pre_norm = LayerNorm2d(in_chs, eps=1e-6)
        self.conv1_1x1 = nn.Conv2d(in_chs, mid_chs, 1)
        self.act1 = nn.GELU()
        self.up = Upsample2d(mid_chs, mid_chs) if upsample else nn.Identity()
        self.conv2_kxk = nn.Conv2d(mid_chs, mid_chs, 3, padding=1, groups=mid_chs)
        self.act2 = nn.GELU()
        self.conv3_1x1 = nn.Conv2d(mid_chs, out_chs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        x = self.act1(self.conv1_1x1(self.pre_norm(x)))
        x = self.act2(self.conv2_kxk(self.up(x)))
        return self.conv3_1x1(x) + shortcut


class InvStem(nn.Module):
    """Inverse of the stem: upsample ×2 (nearest + 3×3 conv), LayerNorm + GELU, 3×3 conv to pixels."""

    def __init__(self, in_chs: int, out_chs: int = 3):
        super().__init__()
        self.conv1 = Upsample2d(in_chs, in_chs)
        self.norm1 = LayerNormAct2d(in_chs, eps=1e-6, act_layer="gelu")
        self.conv2 = nn.Conv2d(in_chs, out_chs, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.norm1(self.conv1(x)))


class ViTaminDecoder(nn.Module):
    """Token features [B, h·w, C] → image [B, 3, 16h, 16w] (unclamped; ≈[-1, 1] once trained).

    ViT blocks + LayerNorm at 1/16, then: up_conv1 (×2 to conv width 2), up_conv2 (inverse MbConv stage, ×2),
    up_conv3 (inverse MbConv stage to conv width 1, ×2), up_conv4 (inverse stem, ×2, to 3 channels).
    """

    def __init__(self, conv_widths: Sequence[int], decoder_conv_depths: Sequence[int], vit_width: int,
                 vit_depth: int, vit_heads: int, mlp_ratio: float = 2.0, drop_path: float = 0.0):
        super().__init__()
        w0, w1 = conv_widths
        d_coarse, d_fine = decoder_conv_depths
        self.blocks = vit_blocks(vit_width, vit_depth, vit_heads, mlp_ratio, drop_path)
        self.norm = ViTLayerNorm(vit_width)
        self.up_conv1 = Upsample2d(vit_width, w1)
        self.up_conv2 = nn.Sequential(*[InvMbConvBlock(w1, w1, upsample=(d == 0)) for d in range(d_coarse)])
        self.up_conv3 = nn.Sequential(*[InvMbConvBlock(w1 if d == 0 else w0, w0, upsample=(d == 0)) for d in range(d_fine)])
        self.up_conv4 = InvStem(w0, 3)
        self.grad_checkpointing = False  # ViT blocks: False, True or "selective"
        self.grad_checkpointing_convs = False  # upsampling stages: False, True or "selective"

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the final conv: where the adaptive GAN weight compares gradient norms (VQGAN)."""
        return self.up_conv4.conv2.weight

    def forward(self, x: torch.Tensor, grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        B, L, C = x.shape
        if grid is None:
            side = int(round(L ** 0.5))
            if side * side != L:
                raise ValueError(f"cannot infer a square token grid from {L} tokens; pass grid=(h, w)")
            grid = (side, side)
        x = _run_blocks(self.blocks, x, self.grad_checkpointing)
        x = self.norm(x)
        x = x.transpose(1, 2).reshape(B, C, grid[0], grid[1])
        mode = "full" if self.grad_checkpointing_convs is True else self.grad_checkpointing_convs
        for stage in self.conv_stages():
            x = run_checkpointed(stage, x, mode)
        return x

    def conv_stages(self) -> Tuple[nn.Module, ...]:
        """The upsampling stages in order (each a unit of checkpointing and of regional compilation)."""
        return (self.up_conv1, *self.up_conv2, *self.up_conv3, self.up_conv4)
