"""Model configuration: one dataclass, named presets, JSON round trip.

Presets follow docs/method.md §1. ``large`` is the released configuration (``meditok_simple_v1.pth``);
``base`` and ``small`` reuse ViTamin-B/S trunk sizes; ``tiny`` is ours, small enough to train a few
steps on a laptop CPU in tests and the quick start.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, Tuple, Union

CONFIG_FILENAME = "config.json"


@dataclass
class MedITokConfig:
    """Every number needed to build a MedITok tokenizer.

    The encoder is a ViTamin hybrid (conv stem + two MbConv stages + a ViT stage at 1/16 resolution),
    the decoder mirrors it, and the bottleneck is attention projection → 8-codebook quantizer →
    attention projection. Only ``img_size`` may differ between a checkpoint and the model it is
    loaded into (the architecture is resolution-agnostic for multiples of 16).
    """

    preset: str = "custom"
    img_size: int = 256
    # Convolutional front of the encoder (mirrored in the decoder).
    stem_width: int = 160
    conv_widths: Tuple[int, int] = (160, 320)
    conv_depths: Tuple[int, int] = (2, 4)
    # ViT stage (encoder and decoder).
    vit_width: int = 1024
    vit_depth: int = 31
    vit_heads: int = 16
    decoder_vit_depth: int = 31
    mlp_ratio: float = 2.0
    # Decoder conv stages, coarse to fine (mirrors conv_depths reversed).
    decoder_conv_depths: Tuple[int, int] = (4, 2)
    # Quantizer: num_codebooks independent codebooks, each codebook_size × (vocab_width / num_codebooks).
    vocab_width: int = 64
    num_codebooks: int = 8
    codebook_size: int = 4096
    vq_beta: float = 0.25
    # Alignment head (contrastive features) width.
    embed_dim: int = 768
    drop_path: float = 0.0

    def __post_init__(self) -> None:
        self.conv_widths = tuple(int(v) for v in self.conv_widths)  # JSON gives lists
        self.conv_depths = tuple(int(v) for v in self.conv_depths)
        self.decoder_conv_depths = tuple(int(v) for v in self.decoder_conv_depths)
        problems = []
        if len(self.conv_widths) != 2 or len(self.conv_depths) != 2 or len(self.decoder_conv_depths) != 2:
            problems.append("conv_widths, conv_depths and decoder_conv_depths must have 2 entries each")
        if self.img_size % 16:
            problems.append(f"img_size={self.img_size} is not a multiple of 16 (the downsampling factor)")
        if self.vit_width % self.vit_heads:
            problems.append(f"vit_width={self.vit_width} is not divisible by vit_heads={self.vit_heads}")
        if self.vocab_width % self.num_codebooks:
            problems.append(f"vocab_width={self.vocab_width} is not divisible by num_codebooks={self.num_codebooks}")
        if self.vit_width % self.vocab_width:
            problems.append(f"vit_width={self.vit_width} is not a multiple of vocab_width={self.vocab_width}")
        if problems:
            raise ValueError("Invalid MedITokConfig: " + "; ".join(problems))

    # Derived sizes -------------------------------------------------------------------------
    @property
    def codebook_dim(self) -> int:
        """Channels per codebook (8 for every preset)."""
        return self.vocab_width // self.num_codebooks

    @property
    def vocab_size(self) -> int:
        """Total vocabulary over all codebooks (32,768 for the released model)."""
        return self.codebook_size * self.num_codebooks

    @property
    def proj_heads(self) -> int:
        """Heads of the attention projections: each head is vocab_width wide."""
        return self.vit_width // self.vocab_width

    def token_grid(self, img_size: int | None = None) -> Tuple[int, int]:
        s = (img_size or self.img_size) // 16
        return (s, s)

    # Serialisation --------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    def to_json(self, path: Union[str, Path, None] = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "MedITokConfig":
        """A config from a dict (a saved ``config.json``); keys of :data:`RETIRED_FIELDS` are dropped."""
        d = {k: v for k, v in d.items() if k not in RETIRED_FIELDS}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown MedITokConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text_or_path: Union[str, Path]) -> "MedITokConfig":
        p = Path(text_or_path) if not str(text_or_path).lstrip().startswith("{") else None
        text = p.read_text() if p is not None else str(text_or_path)
        return cls.from_dict(json.loads(text))

    def replace(self, **overrides: Any) -> "MedITokConfig":
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"Unknown override(s) {unknown}; valid fields: {sorted(known)}")
        return dataclasses.replace(self, **overrides)


#: Fields older versions wrote into every ``config.json`` that never changed the model; reading drops them.
RETIRED_FIELDS = {
    # The MbConv expansion is ×4 in every released and preset model: timm's MbConvStages builds its blocks
    # with the default ratio whatever the config said, so this value was saved but never used.
    "conv_expand_ratio": "the MbConv expansion is fixed at 4",
}


PRESETS: Dict[str, MedITokConfig] = {
    # Released configuration (ViTamin-L trunk): loads meditok_simple_v1.pth strictly.
    "large": MedITokConfig(
        preset="large", stem_width=160, conv_widths=(160, 320), conv_depths=(2, 4),
        vit_width=1024, vit_depth=31, vit_heads=16, decoder_vit_depth=31,
    ),
    "base": MedITokConfig(
        preset="base", stem_width=128, conv_widths=(128, 256), conv_depths=(2, 4),
        vit_width=768, vit_depth=14, vit_heads=12, decoder_vit_depth=14,
    ),
    "small": MedITokConfig(
        preset="small", stem_width=64, conv_widths=(64, 128), conv_depths=(2, 4),
        vit_width=384, vit_depth=14, vit_heads=6, decoder_vit_depth=14,
    ),
    # Ours: for tests and CPU try-outs. Same quantizer (8 × 4096 × 8) so token ids have the
    # released layout; everything else shrunk. 128-px images give an 8×8 token grid.
    "tiny": MedITokConfig(
        preset="tiny", img_size=128, stem_width=32, conv_widths=(32, 64), conv_depths=(1, 2),
        vit_width=128, vit_depth=2, vit_heads=2, decoder_vit_depth=2, decoder_conv_depths=(2, 1),
        embed_dim=768,
    ),
}


def get_config(preset: str = "large", **overrides: Any) -> MedITokConfig:
    """Return the config of a named preset, with field overrides applied."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown MedITok preset {preset!r}; choose one of {list(PRESETS)}")
    cfg = PRESETS[preset]
    return cfg.replace(**overrides) if overrides else dataclasses.replace(cfg)
