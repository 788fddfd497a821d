"""The DINOv2 discriminator of MedITok's released configuration (docs/method.md §2).

A frozen DINOv2 ViT-S/14 reads the image; the tokens (class token + patch tokens) of blocks 0, 2, 5, 8 and
11, taken before the final norm, each feed a small trainable head over the token axis:

    conv1d k=1 → GroupNorm(32) → LeakyReLU(0.2)
    → residual: x + (conv1d k=9, circular padding → GroupNorm(32) → LeakyReLU(0.2))(x), scaled by 1/√2
    → conv1d k=1 to one logit per token

and all token logits are concatenated: ``[B, 5 · (1 + (S/14)²)]`` (1,625 logits at S = 252). Heads are
initialised xavier-normal with gain 0.5 and have no spectral norm.

Before DINO, the [-1, 1] image is mapped to ImageNet mean/std and brought to the largest multiple of the
patch size (14) not above its size — at 256 px, 252 — by a random crop or an area resize, half the time each.

The DINO weights come from a local folder or file loaded by timm (``external/dinov2_vits14``, see
``external/README.md``); ``make_tiny_dino`` writes a tiny random ViT of the same family (patch 14, 12 blocks,
width 32) that loads through the same code for tests and the CPU quick start.

Gradients flow through the frozen DINO to the input image (the generator's adversarial loss needs them);
only ``.heads`` is trainable — save ``disc.heads.state_dict()`` to checkpoint the discriminator.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from local_openclip.constants import DINO_HUB_ID, DINO_PATH, TINY_DINO_NAME, default_location, resolve_source

logger = logging.getLogger(__name__)

DINO_ARCHITECTURE = "vit_small_patch14_dinov2"
DINO_BLOCKS: Tuple[int, ...] = (0, 2, 5, 8, 11)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: DINOv2's training resolution: its position embedding is a 37×37 grid, interpolated to the input's grid.
DINO_IMAGE_SIZE = 518
GROUPNORM_GROUPS = 32
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".bin", ".pt")
_HOW_TO_GET = ("get it with `hf download timm/vit_small_patch14_dinov2.lvd142m --local-dir external/dinov2_vits14` "
               "or `wget https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth` (then pass "
               "that file); see external/README.md. For tests, `python scripts/make_tiny_networks.py` and source='tiny'")


# ---------------------------------------------------------------------------------------------------------------
# The frozen DINOv2 backbone
def _timm_create_arguments(source: Union[str, Path, None]) -> Tuple[str, Dict, str]:
    """Map a DINO ``source`` to ``(timm model name, extra create_model kwargs, description)``; check files exist."""
    given = source
    source = resolve_source(source, DINO_PATH, TINY_DINO_NAME)
    if source.startswith("hf-hub:"):
        return source, {}, source
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path / 'config.json'} is missing: a DINO folder must be in timm's layout "
                                    f"(config.json + model.safetensors), source={given!r}; {_HOW_TO_GET}.")
        if not any(p.suffix in _WEIGHT_SUFFIXES for p in path.iterdir()):
            raise FileNotFoundError(f"No weights file (*.safetensors / *.pth / *.bin) in the DINO folder {path}, "
                                    f"source={given!r}; {_HOW_TO_GET}.")
        return f"local-dir:{path.resolve()}", {}, str(path)
    if path.is_file():
        if path.suffix not in _WEIGHT_SUFFIXES:
            raise ValueError(f"DINO weights file {path} should end in one of {_WEIGHT_SUFFIXES}.")
        # A bare file holds no architecture: it is DINOv2 ViT-S/14, in timm's key layout or the original
        # facebookresearch one (timm's checkpoint filter converts the latter).
        return DINO_ARCHITECTURE, {"pretrained_cfg_overlay": {"file": str(path.resolve())}}, str(path)
    raise FileNotFoundError(f"DINOv2 ViT-S/14 weights not found: {path} (source={given!r}); {_HOW_TO_GET}. "
                            f"Online, source={DINO_HUB_ID!r} loads them from the Hub.")


def load_dino_backbone(source: Union[str, Path, None] = None, device: Union[str, torch.device] = "cpu") -> nn.Module:
    """The frozen DINOv2 ViT (timm ``VisionTransformer``, eval mode, no parameter requires grad).

    ``source``: ``None``/``""`` → ``external/dinov2_vits14`` (``MEDITOK_DINO`` overrides); ``"tiny"`` →
    ``external/tiny/dinov2``; a timm-layout folder (``config.json`` + weights, e.g. the Hub repo
    ``timm/vit_small_patch14_dinov2.lvd142m``); a single ViT-S/14 weights file (timm or original DINOv2 keys);
    or an ``hf-hub:`` id. Weights are loaded strictly by timm. The model takes any input whose sides are
    multiples of its patch size (position embeddings are interpolated from DINOv2's 37×37 grid).
    """
    import timm

    model_name, extra, description = _timm_create_arguments(source)
    backbone = timm.create_model(model_name, pretrained=True, num_classes=0, dynamic_img_size=True,
                                 img_size=DINO_IMAGE_SIZE, **extra)
    if not hasattr(backbone, "blocks") or not hasattr(backbone, "forward_intermediates"):
        raise TypeError(f"{description}: {type(backbone).__name__} is not a timm VisionTransformer (DINOv2 family).")
    backbone.requires_grad_(False)
    backbone.eval()
    logger.info("DINO backbone: %s (width %d, %d blocks, patch %s)", description, backbone.embed_dim,
                len(backbone.blocks), backbone.patch_embed.patch_size)
    return backbone.to(device)


def make_tiny_dino(out_dir: Union[str, Path], seed: int = 0, full_size: bool = False) -> Path:
    """Write a tiny random DINOv2-family ViT (patch 14, width 32, 12 blocks, 2 heads, layer scale) in timm's
    ``local-dir`` layout (``config.json`` + ``model.safetensors``, ≈ 0.9 MB) to ``out_dir``; deterministic.
    ``full_size=True``: ViT-S/14's real sizes (width 384, 6 heads) with random weights, for offline benchmarks."""
    import timm
    from timm.models import save_for_hf

    out_dir = Path(out_dir)
    tiny_args = dict(embed_dim=384, depth=12, num_heads=6) if full_size else dict(embed_dim=32, depth=12, num_heads=2)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # CPU only: models are built on CPU, and
        # torch.manual_seed would also reset every CUDA generator, which fork_rng(devices=[]) does not restore
        model = timm.create_model(DINO_ARCHITECTURE, pretrained=False, num_classes=0, img_size=DINO_IMAGE_SIZE,
                                  **tiny_args)
    for stale in out_dir.glob("*") if out_dir.is_dir() else []:
        if stale.suffix in _WEIGHT_SUFFIXES:
            stale.unlink()
    save_for_hf(model, str(out_dir), model_args=dict(tiny_args, img_size=DINO_IMAGE_SIZE), safe_serialization=True,
                model_config={"pretrained_cfg": {"tag": "tiny_random"}})  # not the lvd142m weights
    return out_dir


# ---------------------------------------------------------------------------------------------------------------
# Trainable heads
@dataclass(frozen=True)
class DinoFit:
    """How one batch was brought to a multiple of the patch size: ``mode`` is "crop" (at ``top``, ``left``),
    "resize" (area) or "none" (already fitted)."""

    mode: str
    top: int = 0
    left: int = 0


class DiscriminatorHead(nn.Module):
    """Per-token logits from one block's tokens: [B, T, C_in] → [B, T]."""

    def __init__(self, in_channels: int, channels: int, negative_slope: float = 0.2):
        super().__init__()
        if channels % GROUPNORM_GROUPS:
            raise ValueError(f"discriminator head width {channels} must be divisible by {GROUPNORM_GROUPS} "
                             f"(GroupNorm groups); pick head_channels accordingly.")
        self.entry = nn.Sequential(nn.Conv1d(in_channels, channels, kernel_size=1),
                                   nn.GroupNorm(GROUPNORM_GROUPS, channels), nn.LeakyReLU(negative_slope))
        # Circular padding: the token axis has no natural border (class token first, then raster order).
        self.residual = nn.Sequential(nn.Conv1d(channels, channels, kernel_size=9, padding=4, padding_mode="circular"),
                                      nn.GroupNorm(GROUPNORM_GROUPS, channels), nn.LeakyReLU(negative_slope))
        self.to_logit = nn.Conv1d(channels, 1, kernel_size=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.entry(tokens.transpose(1, 2))  # [B, C, T]
        x = (x + self.residual(x)) / math.sqrt(2)  # keeps the variance of the sum near that of one branch
        return self.to_logit(x).squeeze(1)

    @torch.no_grad()
    def init_weights(self, gain: float = 0.5) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv1d):
                nn.init.xavier_normal_(module.weight, gain=gain)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)


class DinoDiscriminator(nn.Module):
    """Frozen DINOv2 + trainable per-block heads (module docstring).

    ``forward(images, fit=None, generator=None)``: images [B, 3, H, W] in [-1, 1] → logits [B, T_total]
    (real-vs-fake scores per token, unbounded; T_total = len(block_indices) · (1 + (H'/p)·(W'/p)) with
    H', W' the largest multiples of the patch size p not above H, W).

    ``fit`` chooses how H×W becomes H'×W' when they differ: ``"crop"`` (random crop), ``"resize"`` (area
    resize), ``"random"`` (either, with probability ``crop_probability`` — the released training's rule), or
    ``None``: ``"random"`` in train mode, ``"resize"`` in eval mode (deterministic). One choice per call, for the
    whole batch; ``generator`` (a CPU ``torch.Generator``) makes it reproducible, and a ``DinoFit`` from
    ``draw_fit`` replays a choice exactly (the same crop for several calls).

    ``train()`` affects the heads only; DINO always stays in eval mode with frozen weights.
    """

    def __init__(self, dino: nn.Module, block_indices: Sequence[int] = DINO_BLOCKS,
                 head_channels: Optional[int] = None, crop_probability: float = 0.5, source: str = ""):
        super().__init__()
        depth = len(dino.blocks)
        if max(block_indices) >= depth:
            raise ValueError(f"DINO backbone {source or ''} has {depth} blocks; block indices {tuple(block_indices)} "
                             f"need at least {max(block_indices) + 1}.")
        self.dino = dino
        self.dino.requires_grad_(False)
        self.block_indices = tuple(int(i) for i in block_indices)
        width = int(dino.embed_dim)
        self.head_channels = int(head_channels or width)
        self.heads = nn.ModuleList(DiscriminatorHead(width, self.head_channels) for _ in self.block_indices)
        for head in self.heads:
            head.init_weights(gain=0.5)
        patch = dino.patch_embed.patch_size
        self.patch_size: Tuple[int, int] = (patch, patch) if isinstance(patch, int) else tuple(patch)
        self.crop_probability = float(crop_probability)
        self.source = source
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.dino.eval()

    def train(self, mode: bool = True) -> "DinoDiscriminator":
        super().train(mode)
        self.dino.eval()  # frozen feature extractor: never dropout / drop-path, whatever the heads do
        return self

    def fitted_size(self, height: int, width: int) -> Tuple[int, int]:
        """The largest multiple of the patch size not above each side (256 → 252 for patch 14)."""
        ph, pw = self.patch_size
        if height < ph or width < pw:
            raise ValueError(f"image {height}×{width} is smaller than DINO's patch {ph}×{pw}")
        return (height // ph) * ph, (width // pw) * pw

    def draw_fit(self, height: int, width: int, fit: Optional[str] = None,
                 generator: Optional[torch.Generator] = None) -> DinoFit:
        """Decide how an H×W batch becomes H'×W' (see class docstring); pass the result as ``fit=`` to several
        calls so that they see the same crop — e.g. D(x) and D(aug(x)) compared token by token for BCR."""
        target_h, target_w = self.fitted_size(height, width)
        if (target_h, target_w) == (height, width):
            return DinoFit("none")
        fit = fit or ("random" if self.training else "resize")
        if fit == "random":
            fit = "crop" if torch.rand((), generator=generator).item() < self.crop_probability else "resize"
        if fit == "crop":
            top = int(torch.randint(0, height - target_h + 1, (), generator=generator))
            left = int(torch.randint(0, width - target_w + 1, (), generator=generator))
            return DinoFit("crop", top, left)
        if fit == "resize":
            return DinoFit("resize")
        raise ValueError(f"fit={fit!r}: use 'crop', 'resize', 'random', None or a DinoFit")

    def prepare(self, images: torch.Tensor, fit: Union[str, DinoFit, None] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] → [B, 3, H', W'] ImageNet-normalised, H', W' multiples of the patch size."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"DinoDiscriminator expects [B, 3, H, W] in [-1, 1], got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        target_h, target_w = self.fitted_size(height, width)
        if not isinstance(fit, DinoFit):
            fit = self.draw_fit(height, width, fit=fit, generator=generator)
        if fit.mode == "crop":
            images = images[:, :, fit.top:fit.top + target_h, fit.left:fit.left + target_w]
        elif fit.mode == "resize":
            images = F.interpolate(images, size=(target_h, target_w), mode="area")
        if images.shape[-2:] != (target_h, target_w):
            raise ValueError(f"{fit} does not bring a {height}×{width} image to {target_h}×{target_w}")
        x01 = (images + 1) / 2
        return (x01 - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def block_tokens(self, prepared: torch.Tensor) -> list:
        """DINO tokens of each chosen block before the final norm: list of [B, 1 + N, C] (class token first)."""
        features = self.dino.forward_intermediates(prepared, indices=list(self.block_indices), norm=False,
                                                   stop_early=True, output_fmt="NLC", intermediates_only=True,
                                                   return_prefix_tokens=True)
        return [torch.cat([prefix, patches], dim=1) for patches, prefix in features]

    def forward(self, images: Union[torch.Tensor, Sequence[torch.Tensor]], fit=None,
                generator: Optional[torch.Generator] = None):
        """Logits [B, T_total] for one batch; or, given a list of batches (and optionally a list of fits, one
        per batch), a list of their logits computed in ONE DINO + heads pass over the concatenated batches —
        what the discriminator step uses for its four batches (real, fake and their BCR copies). Every part
        of the network works per sample, so the result equals separate calls."""
        if isinstance(images, torch.Tensor):
            return self._logits(self.prepare(images, fit=fit, generator=generator))
        fits = list(fit) if isinstance(fit, (list, tuple)) else [fit] * len(images)
        if len(fits) != len(images):
            raise ValueError(f"{len(images)} batches but {len(fits)} fits: give one fit per batch (or one for all)")
        prepared = [self.prepare(x, fit=f, generator=generator) for x, f in zip(images, fits)]
        return list(self._logits(torch.cat(prepared)).split([p.shape[0] for p in prepared]))

    def _logits(self, prepared: torch.Tensor) -> torch.Tensor:
        tokens = self.block_tokens(prepared)
        return torch.cat([head(block) for head, block in zip(self.heads, tokens)], dim=1)


def build_discriminator(source: Union[str, Path, None] = None, device: Union[str, torch.device] = "cpu",
                        block_indices: Sequence[int] = DINO_BLOCKS, head_channels: Optional[int] = None
                        ) -> DinoDiscriminator:
    """DINOv2 discriminator with freshly initialised heads; ``source`` as in :func:`load_dino_backbone`."""
    dino = load_dino_backbone(source, device="cpu")
    disc = DinoDiscriminator(dino, block_indices=block_indices, head_channels=head_channels,
                             source=str(source or default_location(DINO_PATH)))
    return disc.to(device)


__all__ = ["DinoDiscriminator", "DinoFit", "DiscriminatorHead", "build_discriminator", "load_dino_backbone", "make_tiny_dino",
           "DINO_BLOCKS", "DINO_ARCHITECTURE"]
