"""MedITok as the image encoder of a language model (paper Table 4; docs/vqa.md).

The released LLaVA-Med integration feeds the language model the tokenizer's *post-quantisation* features
after the output projection: image [B, 3, H, W] in [-1, 1] → encoder → attention projection down to 64
channels → 8-codebook quantisation (token ids) → codeword vectors → attention projection back up to the
ViT width. That gives L = (H/16)·(W/16) tokens of ``vit_width`` channels (256 × 1,024 for ``large`` at
256 px), the same tokens MedITok's decoder reads. ``features="quantized"`` is that path.

Ablations (``features=``):
  ``continuous``  the same output projection applied to the *pre-quantisation* latent (no codebook lookup)
  ``encoder``     the encoder's ViT tokens before the bottleneck ([B, L, vit_width])

The tower is frozen (``requires_grad=False``, always in eval mode, run under ``torch.no_grad``). On GPU it
can run the encoder in bf16 (``dtype=torch.bfloat16``); the bottleneck always runs in float32, as in
MedITok itself, because cosine assignment over 4,096 codewords is sensitive to bf16 rounding.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

import meditok
from meditok.data import eval_transform, normalise_modality, read_image
from meditok.model import MedITok
from meditok.quantizer import autocast_off

FEATURE_KINDS = ("quantized", "continuous", "encoder")
RANDOM_PREFIX = "random:"


def load_tokenizer_for_tower(source: str, preset: Optional[str] = None, device: Union[str, torch.device] = "cpu",
                             seed: int = 0) -> MedITok:
    """A MedITok from anything ``meditok.load_meditok`` accepts, or ``random:<preset>`` (seeded random
    weights, for smoke tests only)."""
    if str(source).startswith(RANDOM_PREFIX):
        name = str(source)[len(RANDOM_PREFIX):] or "tiny"
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        model = meditok.build_meditok(name, device=device)
        torch.random.set_rng_state(generator_state)  # building a tower must not move the caller's RNG
        return model
    return meditok.load_meditok(source, preset=preset, device=device)


class MedITokVisionTower(nn.Module):
    """Frozen MedITok image encoder giving the tokens a language model sees.

    Args:
        tokenizer: a MedITok (any preset, any weights).
        features: one of :data:`FEATURE_KINDS` (default ``quantized``, the released integration).
        dtype: autocast dtype for the encoder on CUDA (``torch.bfloat16``); None runs float32 throughout.
        img_size: the side images are resized to (default: the tokenizer's native size).
    """

    def __init__(self, tokenizer: MedITok, features: str = "quantized", dtype: Optional[torch.dtype] = None,
                 img_size: Optional[int] = None):
        super().__init__()
        if features not in FEATURE_KINDS:
            raise ValueError(f"vision-tower features {features!r}: use one of {FEATURE_KINDS}")
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        self.features = features
        self.autocast_dtype = dtype
        self.img_size = int(img_size or tokenizer.config.img_size)
        if self.img_size % 16:
            raise ValueError(f"image size {self.img_size} is not a multiple of 16 (MedITok's downsampling factor)")
        self._transform = eval_transform(self.img_size)

    @classmethod
    def from_source(cls, source: str, features: str = "quantized", preset: Optional[str] = None,
                    img_size: Optional[int] = None, device: Union[str, torch.device] = "cpu",
                    dtype: Optional[torch.dtype] = None, seed: int = 0) -> "MedITokVisionTower":
        """Load the tokenizer from ``source`` (a checkpoint, folder, Hub id, or ``random:tiny``)."""
        return cls(load_tokenizer_for_tower(source, preset, device, seed), features, dtype, img_size)

    # ------------------------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        """Channels of each image feature (the tokenizer's ViT width)."""
        return self.tokenizer.config.vit_width

    @property
    def num_tokens(self) -> int:
        """Image features per image at ``img_size``: (img_size/16)²."""
        h, w = self.tokenizer.token_grid(self.img_size)
        return h * w

    @property
    def device(self) -> torch.device:
        return self.tokenizer.device

    def train(self, mode: bool = True) -> "MedITokVisionTower":
        # Frozen: dropout/drop-path stay off even when the multimodal model is put in training mode.
        return super().train(False)

    # ------------------------------------------------------------------------------------------------
    def load_image(self, path: Union[str, Path], modality: Optional[str] = None) -> torch.Tensor:
        """Read any file ``meditok.data.read_image`` reads → [3, img_size, img_size] in [-1, 1] (CT through the
        default 'common' window; short side resized then centre-cropped, as in the evaluations)."""
        return self._transform(read_image(path, normalise_modality(modality) or None))

    def load_images(self, paths: Sequence[Union[str, Path]], modalities: Optional[Sequence[Optional[str]]] = None
                    ) -> torch.Tensor:
        """Several files → [N, 3, img_size, img_size] in [-1, 1]."""
        modalities = modalities or [None] * len(paths)
        return torch.stack([self.load_image(p, m) for p, m in zip(paths, modalities)])

    def _autocast(self):
        if self.autocast_dtype is None or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.autocast_dtype)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] (H, W multiples of 16) → features [B, (H/16)·(W/16), hidden_size],
        float32 (the bottleneck's precision; the projector casts as it needs)."""
        model = self.tokenizer
        images = images.to(self.device, torch.float32)
        with self._autocast():
            if self.features == "encoder":
                model._check_image(images)
                return model.encoder(images).float()
            latent, _ = model.encode_latent(images)  # [B, L, 64], float32
        with autocast_off(latent):
            if self.features == "quantized":
                ids = model.quantizer.f_to_idx(latent)            # [B, 8, L]
                latent = model.quantizer.idx_to_f(ids)             # [B, L, 64] unit-norm codewords
            return model.post_quant_proj(latent.float()).float()   # [B, L, vit_width]

    def extra_repr(self) -> str:
        return (f"features={self.features}, img_size={self.img_size}, tokens={self.num_tokens}, "
                f"hidden_size={self.hidden_size}, dtype={self.autocast_dtype}")
