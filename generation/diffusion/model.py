"""The denoiser of the joint image–report masked diffusion: one bidirectional transformer over
[report text tokens; image tokens], conditioned on two timesteps and a modality label.

Layout of one sequence (``Lt`` = text budget, ``N`` = h·w image positions, ``K`` = codebook size,
``V`` = text vocabulary size)::

    text ids   [B, Lt]      in [0, V]   (V = the text mask token)
    image ids  [B, 8, N]    in [0, K]   (K = the image mask token; a position is masked as a whole)

Image positions are embedded as the sum of 8 per-codebook embeddings (a masked position gets a
learned mask embedding instead) and predicted by 8 per-codebook heads in parallel; text uses the
backbone's own tokenizer/embedding. Attention is full (no causal mask). Every block is modulated
by AdaLN-zero (DiT, Peebles & Xie 2023) from c = emb(t_text) + emb(t_image) + emb(label): the
modulation is zero at initialisation, so every block starts as the identity.

Backbones: the from-scratch presets ``tiny`` and ``B``, or any Llama/Qwen/Gemma-family
``transformers.AutoModelForCausalLM`` folder (``backbone=<path>``, truncated to ``num_layers``
decoder layers as MeDiM cuts its 7B backbone to 10), whose causal mask is removed.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

SCRATCH = "scratch"


class DiffusionConfigError(ValueError):
    """A bad preset, backbone or config value (message names the value and the fix)."""


@dataclass
class DiffusionConfig:
    """Every number needed to build the denoiser (saved in checkpoints as JSON)."""

    preset: str = "custom"
    backbone: str = SCRATCH          # "scratch" or a local folder of an HF causal LM
    num_layers: int = 0              # HF backbone: keep the first num_layers decoder layers (0 = all)
    width: int = 768                 # scratch only (HF: the backbone's hidden_size)
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    text_len: int = 256              # text budget in tokens (captions are truncated to it, with a warning)
    text_vocab_size: int = 0         # set from the text tokenizer; V (the mask id is V)
    text_tokenizer: str = ""         # local folder of the HF tokenizer (HF backbone: the backbone folder)
    num_codebooks: int = 8
    codebook_size: int = 4096        # K (the image mask id is K)
    grid: Tuple[int, int] = (16, 16)  # image token grid (h, w): N = h·w positions
    condition_names: List[str] = field(default_factory=list)  # modality labels; the null label is len()
    condition_dropout: float = 0.1   # probability of replacing the label by null in training (for CFG)
    time_freq_dim: int = 256
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        self.grid = tuple(int(v) for v in self.grid)
        if len(self.grid) != 2:
            raise DiffusionConfigError(f"grid={self.grid} must be (h, w)")
        if self.backbone == SCRATCH and self.width % self.heads:
            raise DiffusionConfigError(f"width={self.width} is not divisible by heads={self.heads}")
        if not 0.0 <= self.condition_dropout < 1.0:
            raise DiffusionConfigError(f"condition_dropout={self.condition_dropout} must be in [0, 1)")

    @property
    def num_positions(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_conditions(self) -> int:
        return len(self.condition_names)

    @property
    def text_mask_id(self) -> int:
        return self.text_vocab_size

    @property
    def image_mask_id(self) -> int:
        return self.codebook_size

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["grid"] = list(self.grid)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DiffusionConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DiffusionConfigError(f"unknown diffusion config field(s) {unknown}; valid: {sorted(known)}")
        return cls(**d)

    def replace(self, **overrides: Any) -> "DiffusionConfig":
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise DiffusionConfigError(f"unknown diffusion config field(s) {unknown}; valid: {sorted(known)}")
        return dataclasses.replace(self, **overrides)


PRESETS: Dict[str, DiffusionConfig] = {
    # CPU tests and the quick start: 128-px MedITok tiny tokens (8×8 grid), short captions.
    "tiny": DiffusionConfig(preset="tiny", width=64, depth=2, heads=4, mlp_ratio=2.0, text_len=48,
                            grid=(8, 8), time_freq_dim=64),
    # LlamaGen-B-sized trunk (12 layers, width 768) over 256-px tokens (16×16) and MeDiM's 256 text tokens.
    "B": DiffusionConfig(preset="B", width=768, depth=12, heads=12, mlp_ratio=4.0, text_len=256, grid=(16, 16)),
    # Built from a pretrained HF causal LM; set backbone=<folder> (and num_layers).
    "hf": DiffusionConfig(preset="hf", backbone="", num_layers=10, text_len=256, grid=(16, 16)),
}


def get_config(preset: str, **overrides: Any) -> DiffusionConfig:
    """The config of a named preset (``tiny``, ``B``, ``hf``) with field overrides applied."""
    if preset not in PRESETS:
        raise DiffusionConfigError(f"unknown diffusion preset {preset!r}; choose one of {list(PRESETS)}")
    cfg = PRESETS[preset].replace(**overrides)
    if preset == "hf" and (not cfg.backbone or cfg.backbone == SCRATCH):
        raise DiffusionConfigError("preset 'hf' needs backbone=<folder of a transformers causal LM> "
                                   "(e.g. --backbone /models/Qwen2.5-0.5B)")
    return cfg


# --------------------------------------------------------------------------------------------------
# Pieces

def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN: x [B, L, D], shift/scale [B, D] → x·(1 + scale) + shift."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """t [B] in [0, 1] (the masked fraction's time) → [B, D]: sinusoids of 1000·t, then an MLP."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = 1000.0 * t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class AdaLNBlock(nn.Module):
    """Pre-norm transformer block, full attention, AdaLN-zero: x [B, L, D], c [B, D] → [B, L, D]."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        nn.init.zeros_(self.modulation[1].weight)  # AdaLN-zero: gates start at 0 → the block is the identity
        nn.init.zeros_(self.modulation[1].bias)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=False)  # bidirectional by design
        return self.proj(out.transpose(1, 2).reshape(b, length, d))

    def forward(self, x: torch.Tensor, c: torch.Tensor, **_: Any) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attention(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class AdaLNWrappedLayer(nn.Module):
    """AdaLN-zero around a pretrained HF decoder layer f (which has its own norms and residuals):
    h = x·(1+scale)+shift, out = x + gate·(f(h) − h). Gate 0 at init → identity; with gate 1 and
    zero shift/scale it is exactly the pretrained layer."""

    def __init__(self, layer: nn.Module, width: int):
        super().__init__()
        self.layer = layer
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, position_embeddings=None, position_ids=None) -> torch.Tensor:
        shift, scale, gate = self.modulation(c).chunk(3, dim=-1)
        h = modulate(x, shift, scale)
        out = self.layer(h, attention_mask=None, position_ids=position_ids,
                         position_embeddings=position_embeddings, is_causal=False)
        if isinstance(out, tuple):
            out = out[0]
        return x + gate.unsqueeze(1) * (out - h)


# --------------------------------------------------------------------------------------------------
# HF backbone

def load_hf_backbone(path: Union[str, Path], num_layers: int = 0, dtype: Optional[torch.dtype] = None):
    """A local ``AutoModelForCausalLM`` folder → (model, hidden_size), its decoder truncated to the first
    ``num_layers`` layers (0 = all) and every attention made bidirectional (``is_causal = False``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise DiffusionConfigError(
            f"backbone {str(path)!r} is not a folder with a transformers config.json; use 'scratch' (presets "
            f"tiny/B) or a local causal-LM folder saved with save_pretrained (no downloads at run time)")
    hf_config = AutoConfig.from_pretrained(folder)
    total = getattr(hf_config, "num_hidden_layers", None)
    if total is None:
        raise DiffusionConfigError(f"backbone {folder}: config has no num_hidden_layers ({hf_config.model_type}); "
                                   f"only Llama/Qwen/Gemma-family decoder layouts are supported")
    if num_layers < 0 or num_layers > total:
        raise DiffusionConfigError(f"num_layers={num_layers} but backbone {folder} has {total} layers; "
                                   f"choose 1..{total} (0 keeps all)")
    keep = num_layers or total
    hf_config.num_hidden_layers = keep  # never builds (or loads) the layers that would be cut
    if hasattr(hf_config, "layer_types") and hf_config.layer_types is not None:
        hf_config.layer_types = list(hf_config.layer_types)[:keep]
    kwargs = {} if dtype is None else {"dtype": dtype}
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the cut layers' weights are "unexpected keys": one line below instead
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, config=hf_config, attn_implementation="sdpa", **kwargs)
        except ValueError as error:
            if "scaled_dot_product_attention" not in str(error):
                raise
            # e.g. Gemma 2 (attention soft-capping): no SDPA path; eager attention is bidirectional without a mask too
            model = AutoModelForCausalLM.from_pretrained(folder, config=hf_config, attn_implementation="eager", **kwargs)
    except ValueError as error:  # unknown architecture
        raise DiffusionConfigError(f"backbone {folder}: transformers cannot build {hf_config.model_type!r} as a "
                                   f"causal LM ({error})") from error
    finally:
        hf_logging.set_verbosity(verbosity)
    print(f"[diffusion] backbone {folder.name} ({hf_config.model_type}): kept {keep} of {total} decoder layers, "
          f"causal mask removed")
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "embed_tokens"):
        raise DiffusionConfigError(f"backbone {folder} ({hf_config.model_type}) has no model.layers / "
                                   f"model.embed_tokens; only Llama/Qwen/Gemma-family layouts are supported")
    for layer in inner.layers:
        attn = getattr(layer, "self_attn", None)
        if attn is not None:
            attn.is_causal = False  # the causal mask removed (MeDiM): sdpa/eager/flash all read this flag
    return model, hf_config.hidden_size


# --------------------------------------------------------------------------------------------------
# The model

class JointDiffusionTransformer(nn.Module):
    """Denoiser p(x₀ | x_t) over [text; image]. See the module docstring for the sequence layout."""

    def __init__(self, config: DiffusionConfig, hf_model: Optional[nn.Module] = None):
        super().__init__()
        if config.text_vocab_size <= 0:
            raise DiffusionConfigError("text_vocab_size is 0: set it from the text tokenizer (len(tokenizer))")
        self.config = config
        self.is_hf = config.backbone != SCRATCH
        k, n = config.codebook_size, config.num_positions
        if self.is_hf:
            if hf_model is None:
                hf_model, _ = load_hf_backbone(config.backbone, config.num_layers)
            width = hf_model.config.hidden_size
            inner = hf_model.model
            self.text_embed = inner.embed_tokens
            self.blocks = nn.ModuleList(AdaLNWrappedLayer(layer, width) for layer in inner.layers)
            self.rotary = inner.rotary_emb
            self.final_norm = inner.norm
            self.text_head = hf_model.get_output_embeddings()
            # Gemma scales its input embeddings by sqrt(hidden) inside the model forward we bypass.
            self.embed_scale = math.sqrt(width) if "gemma" in hf_model.config.model_type else 1.0
            if hf_model.config.vocab_size < config.text_vocab_size:
                raise DiffusionConfigError(f"text_vocab_size={config.text_vocab_size} exceeds the backbone's "
                                           f"vocab_size={hf_model.config.vocab_size}")
        else:
            width = config.width
            self.text_embed = nn.Embedding(config.text_vocab_size, width)
            self.text_pos = nn.Parameter(torch.randn(config.text_len, width) * 0.02)
            self.blocks = nn.ModuleList(AdaLNBlock(width, config.heads, config.mlp_ratio) for _ in range(config.depth))
            self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
            self.text_head = nn.Linear(width, config.text_vocab_size)
            self.embed_scale = 1.0
        self.width = width
        self.text_mask_embed = nn.Parameter(torch.randn(width) * 0.02)
        self.image_embed = nn.ModuleList(nn.Embedding(k, width) for _ in range(config.num_codebooks))
        self.image_mask_embed = nn.Parameter(torch.randn(width) * 0.02)
        self.image_pos = nn.Parameter(torch.randn(n, width) * 0.02)
        self.image_heads = nn.ModuleList(nn.Linear(width, k) for _ in range(config.num_codebooks))
        self.time_text = TimestepEmbedder(width, config.time_freq_dim)
        self.time_image = TimestepEmbedder(width, config.time_freq_dim)
        self.condition_embed = nn.Embedding(config.num_conditions + 1, width)  # last row = null label
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        nn.init.zeros_(self.final_modulation[1].weight)
        nn.init.zeros_(self.final_modulation[1].bias)
        if not self.is_hf:
            for emb in self.image_embed:
                nn.init.normal_(emb.weight, std=0.02)
            nn.init.normal_(self.text_embed.weight, std=0.02)
        self.grad_checkpointing = config.grad_checkpointing

    # ---- properties
    @property
    def null_label(self) -> int:
        return self.config.num_conditions

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    # ---- embedding
    def embed_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """[B, Lt] in [0, V] → [B, Lt, D]; the mask id V gets the learned mask embedding."""
        mask = text_ids == self.config.text_mask_id
        x = self.text_embed(text_ids.masked_fill(mask, 0)) * self.embed_scale
        x = torch.where(mask.unsqueeze(-1), self.text_mask_embed.to(x.dtype), x)
        if not self.is_hf:
            x = x + self.text_pos[: text_ids.shape[1]]
        return x

    def embed_image(self, image_ids: torch.Tensor) -> torch.Tensor:
        """[B, 8, N] in [0, K] → [B, N, D]: sum of 8 codebook embeddings, or the mask embedding where any
        code of the position is K."""
        mask = (image_ids == self.config.image_mask_id).any(dim=1)  # [B, N]
        safe = image_ids.masked_fill(image_ids == self.config.image_mask_id, 0)
        x = sum(emb(safe[:, i]) for i, emb in enumerate(self.image_embed))
        x = torch.where(mask.unsqueeze(-1), self.image_mask_embed.to(x.dtype), x)
        return x + self.image_pos

    def condition(self, t_text: torch.Tensor, t_image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """t_text, t_image [B] in [0, 1] (0 = clean), labels [B] in [0, C] (C = null) → c [B, D].
        In training, labels are replaced by null with probability ``condition_dropout`` (for CFG)."""
        if self.training and self.config.condition_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.config.condition_dropout
            labels = labels.masked_fill(drop, self.null_label)
        return self.time_text(t_text) + self.time_image(t_image) + self.condition_embed(labels)

    # ---- forward
    def forward(self, text_ids: torch.Tensor, image_ids: torch.Tensor, t_text: torch.Tensor,
                t_image: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """text_ids [B, Lt], image_ids [B, 8, N], t_text/t_image [B], labels [B] →
        (text logits [B, Lt, V], image logits [B, 8, N, K]), float32."""
        cfg = self.config
        if image_ids.shape[1:] != (cfg.num_codebooks, cfg.num_positions):
            raise DiffusionConfigError(f"image ids of shape {tuple(image_ids.shape)} do not match the model's "
                                       f"[B, {cfg.num_codebooks}, {cfg.num_positions}] (grid {cfg.grid}); "
                                       f"the token cache and the model were made for different image sizes")
        if text_ids.shape[1] > cfg.text_len:
            raise DiffusionConfigError(f"text of {text_ids.shape[1]} tokens exceeds text_len={cfg.text_len}")
        lt = text_ids.shape[1]
        x = torch.cat([self.embed_text(text_ids), self.embed_image(image_ids)], dim=1)
        c = self.condition(t_text, t_image, labels).to(x.dtype)
        extra: Dict[str, Any] = {}
        if self.is_hf:
            position_ids = torch.arange(x.shape[1], device=x.device).unsqueeze(0).expand(x.shape[0], -1)
            extra = {"position_embeddings": self.rotary(x, position_ids), "position_ids": position_ids}
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, c, use_reentrant=False, **extra)
            else:
                x = block(x, c, **extra)
        shift, scale = self.final_modulation(c).chunk(2, dim=-1)
        x = modulate(self.final_norm(x), shift, scale)
        text_logits = self.text_head(x[:, :lt])[..., : cfg.text_vocab_size]
        image_x = x[:, lt:]
        image_logits = torch.stack([head(image_x) for head in self.image_heads], dim=1)
        return text_logits.float(), image_logits.float()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(config: DiffusionConfig) -> JointDiffusionTransformer:
    """Build from a config (loads the HF backbone's pretrained weights when ``backbone`` is a folder)."""
    return JointDiffusionTransformer(config)


def config_from_checkpoint(payload: Dict[str, Any], source: str) -> DiffusionConfig:
    if "diffusion_config" not in payload:
        raise DiffusionConfigError(f"{source} is not a diffusion checkpoint (no 'diffusion_config'); "
                                   f"pass a file written by python -m generation.diffusion.train")
    return DiffusionConfig.from_dict(payload["diffusion_config"])


def check_same_architecture(saved: DiffusionConfig, wanted: DiffusionConfig, source: str) -> None:
    """Raise naming the first differing field when a checkpoint's config differs from the requested one."""
    keys = ("preset", "backbone", "num_layers", "width", "depth", "heads", "text_len", "text_vocab_size",
            "num_codebooks", "codebook_size", "grid", "condition_names")
    a, b = saved.to_dict(), wanted.to_dict()
    diffs = [f"{k}: checkpoint {a[k]!r} vs requested {b[k]!r}" for k in keys if a[k] != b[k]]
    if diffs:
        raise DiffusionConfigError(f"{source} was trained with a different model ({'; '.join(diffs[:3])}); "
                                   f"use the checkpoint's own config or start a new run directory")


def save_config_json(config: DiffusionConfig, path: Union[str, Path]) -> None:
    Path(path).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
