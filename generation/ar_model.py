"""An autoregressive generator over MedITok's multi-codebook token grid (the paper's Table 3 model).

Layout (paper §5 / docs/method.md §5): an image is ids [8, L] (8 codebooks × L = h·w grid positions
in raster order, each id in [0, 4096)). The generator is a decoder-only transformer in the LlamaGen
style: RMSNorm, SwiGLU feed-forward, rotary position embeddings over the 2D token grid (half of each
head's channels rotate with the row, half with the column), and ``num_condition_tokens`` label tokens
in front (a modality label; index ``num_labels`` is the null label for classifier-free guidance).

* input at position t = the sum of 8 per-codebook embeddings of its codes;
* the trunk's state after position t-1 predicts the 8 codes of position t;
* ``head="sequential"`` (the released variant): a small causal transformer over the 8 codebook slots
  predicts code k from the trunk state and the codes < k of the same position;
  ``head="independent"``: 8 linear heads predict the 8 codes from the trunk state alone.

Sequence fed to the trunk (teacher forcing), n_c condition tokens then L-1 positions::

    [c_1 .. c_nc, e_0, e_1, ..., e_{L-2}]  →  states at indices nc-1 .. nc+L-2 predict positions 0 .. L-1

Presets: ``tiny`` (tests, CPU), ``B`` = 12 layers, 12 heads, width 768 (the paper's LlamaGen-B), ``L`` and
``XL`` (LlamaGen's L/XL sizes). Sampling with a static KV cache lives in :mod:`generation.sample`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .conditioning import LabelEmbedding

HEAD_KINDS = ("sequential", "independent")


@dataclass
class ARConfig:
    """Every number needed to build the generator; data-dependent sizes (grid, labels) come from the token cache."""

    preset: str = "custom"
    depth: int = 12
    heads: int = 12
    width: int = 768
    mlp_hidden: int = 0                  # SwiGLU hidden width; 0 = 8/3·width rounded up to a multiple of 64
    head: str = "sequential"             # or "independent"
    head_depth: int = 2                  # layers of the sequential codebook head
    num_codebooks: int = 8
    codebook_size: int = 4096
    grid: Tuple[int, int] = (16, 16)
    num_labels: int = 6
    num_condition_tokens: int = 1
    class_dropout: float = 0.1
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        self.grid = tuple(int(v) for v in self.grid)
        problems = []
        if self.head not in HEAD_KINDS:
            problems.append(f"head={self.head!r} is not one of {HEAD_KINDS}")
        if self.width % self.heads:
            problems.append(f"width={self.width} is not divisible by heads={self.heads}")
        elif (self.width // self.heads) % 4:
            problems.append(f"head width {self.width // self.heads} must be a multiple of 4 (2D rotary embedding)")
        if self.codebook_size > 65536:
            problems.append(f"codebook_size={self.codebook_size} does not fit the caches' uint16 ids")
        if problems:
            raise ValueError("Invalid ARConfig: " + "; ".join(problems))

    @property
    def seq_len(self) -> int:
        """Grid positions L = h·w."""
        return self.grid[0] * self.grid[1]

    @property
    def hidden(self) -> int:
        return self.mlp_hidden or 64 * math.ceil(8 * self.width / 3 / 64)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["grid"] = list(self.grid)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ARConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown ARConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


AR_PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(depth=2, heads=2, width=64, head_depth=1),
    "B": dict(depth=12, heads=12, width=768, head_depth=2),     # LlamaGen-B (the paper's generator)
    "L": dict(depth=24, heads=16, width=1024, head_depth=2),    # LlamaGen-L
    "XL": dict(depth=36, heads=20, width=1280, head_depth=2),   # LlamaGen-XL
}


def get_ar_config(preset: str, **overrides: Any) -> ARConfig:
    """The config of a named preset (``tiny``, ``B``, ``L``, ``XL``) with field overrides."""
    if preset not in AR_PRESETS:
        raise ValueError(f"Unknown generator preset {preset!r}; choose one of {list(AR_PRESETS)}")
    return ARConfig(preset=preset, **{**AR_PRESETS[preset], **overrides})


# --------------------------------------------------------------------------------------------------
# Rotary position embedding over the 2D grid

def grid_rotary_tables(config: ARConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [nc + L, head_dim] for every trunk input index.

    Condition tokens get angle 0 (no rotation); the token of grid position t = (r, c) rotates the first
    half of each head's channels by r·ω_j and the second half by c·ω_j, ω_j = base^(-j / (head_dim/4)).
    """
    head_dim = config.width // config.heads
    quarter = head_dim // 4
    inv_freq = config.rope_base ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    h, w = config.grid
    rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w)
    cols = torch.arange(w, dtype=torch.float64).repeat(h)
    angles_row = rows[:, None] * inv_freq           # [L, hd/4]
    angles_col = cols[:, None] * inv_freq
    # rotate-half convention inside each half: the angle table is repeated for the two quarter blocks.
    angles = torch.cat([angles_row, angles_row, angles_col, angles_col], dim=-1)   # [L, hd]
    angles = torch.cat([torch.zeros(config.num_condition_tokens, head_dim, dtype=torch.float64), angles])
    return angles.cos().float(), angles.sin().float()


def _rotate_half_blocks(x: torch.Tensor) -> torch.Tensor:
    """Within each half of the channels (row half, column half): (a, b) → (−b, a)."""
    r1, r2, c1, c2 = x.chunk(4, dim=-1)
    return torch.cat([-r2, r1, -c2, c1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd]; cos, sin [T, hd] → rotated x (same shape and dtype)."""
    return (x.float() * cos + _rotate_half_blocks(x.float()) * sin).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Transformer pieces

class KVCache:
    """Static key/value cache of one layer: [B, H, T_max, hd] buffers filled left to right."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, device, dtype):
        self.k = torch.zeros(batch, heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> Tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor, rotary: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                cache: Optional[KVCache] = None, start: int = 0) -> torch.Tensor:
        """x [B, T, D]; rotary: (cos, sin) [T, hd] for these T positions or None; with ``cache``, the T new
        tokens sit at indices start..start+T-1 and attend to everything cached before them."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k, v = cache.update(k, v, start)
            if T == 1:
                out = F.scaled_dot_product_attention(q, k, v)
            else:  # a block of new tokens (the condition prefix): causal among themselves
                allowed = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(width, hidden, bias=False)
        self.up = nn.Linear(width, hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.attn_norm = nn.RMSNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.mlp_norm = nn.RMSNorm(width, eps=eps)
        self.mlp = SwiGLU(width, hidden)

    def forward(self, x, rotary=None, cache=None, start=0):
        x = x + self.attn(self.attn_norm(x), rotary, cache, start)
        return x + self.mlp(self.mlp_norm(x))


# --------------------------------------------------------------------------------------------------
# Output heads

class IndependentHeads(nn.Module):
    """8 linear heads: state [B, L, D] → logits [B, L, K, V], code k from the state alone."""

    def __init__(self, config: ARConfig):
        super().__init__()
        self.K, self.V = config.num_codebooks, config.codebook_size
        self.norm = nn.RMSNorm(config.width, eps=config.norm_eps)
        self.out = nn.Linear(config.width, self.K * self.V, bias=False)

    def forward(self, state: torch.Tensor, ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.out(self.norm(state)).unflatten(-1, (self.K, self.V))

    def codebook_logits(self, state: torch.Tensor, codes: torch.Tensor, k: int) -> torch.Tensor:
        """Logits [B, V] of code k of one position (``codes`` [B, k] are ignored: heads are independent)."""
        weight = self.out.weight[k * self.V:(k + 1) * self.V]
        return F.linear(self.norm(state), weight)


class SequentialCodebookHead(nn.Module):
    """Code k of a position from the trunk state and the codes < k: a causal transformer over K slots.

    Slot 0's input is the trunk state; slot k's is the state plus the embedding of code k-1 (from
    codebook k-1), plus a learned slot embedding. Slot k's output gives code k's logits through its own
    output matrix. Training runs all K slots at once over [B·L, K, D].
    """

    def __init__(self, config: ARConfig):
        super().__init__()
        self.K, self.V, D = config.num_codebooks, config.codebook_size, config.width
        self.code_embedding = nn.Embedding((self.K - 1) * self.V, D)   # codes 0..K-2 feed slots 1..K-1
        self.slot_embedding = nn.Parameter(torch.zeros(self.K, D))
        self.blocks = nn.ModuleList(Block(D, config.heads, config.hidden, config.norm_eps)
                                    for _ in range(config.head_depth))
        self.norm = nn.RMSNorm(D, eps=config.norm_eps)
        self.out = nn.Parameter(torch.zeros(self.K, self.V, D))
        nn.init.normal_(self.out, std=0.02)

    def _slots(self, state: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """state [N, D], codes [N, k] (k < K) → slot inputs [N, k+1, D]."""
        offsets = torch.arange(codes.shape[1], device=codes.device) * self.V
        previous = self.code_embedding(codes + offsets) if codes.shape[1] else state.new_zeros(state.shape[0], 0, state.shape[1])
        slots = torch.cat([state[:, None], state[:, None] + previous], dim=1)
        return slots + self.slot_embedding[: slots.shape[1]]

    def _run(self, slots: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            slots = block(slots)
        return self.norm(slots)

    def forward(self, state: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """state [B, L, D], ids [B, K, L] (teacher forcing) → logits [B, L, K, V]."""
        B, L, D = state.shape
        codes = ids.permute(0, 2, 1).reshape(B * L, self.K)[:, :-1]
        hidden = self._run(self._slots(state.reshape(B * L, D), codes))           # [B·L, K, D]
        logits = torch.einsum("nkd,kvd->nkv", hidden, self.out.to(hidden.dtype))
        return logits.view(B, L, self.K, self.V)

    def codebook_logits(self, state: torch.Tensor, codes: torch.Tensor, k: int) -> torch.Tensor:
        """state [B, D], codes [B, k] already chosen for this position → logits [B, V] of code k.

        Recomputes the k+1 slots (at most 8): exact, since the head is causal over slots.
        """
        hidden = self._run(self._slots(state, codes))[:, -1]
        return F.linear(hidden, self.out[k].to(hidden.dtype))


# --------------------------------------------------------------------------------------------------
# The generator

class ARGenerator(nn.Module):
    """Label-conditioned autoregressive generator over ids [B, K, L] (see module docstring)."""

    def __init__(self, config: ARConfig):
        super().__init__()
        self.config = c = config
        self.K, self.V, self.L, self.nc = c.num_codebooks, c.codebook_size, c.seq_len, c.num_condition_tokens
        self.condition = LabelEmbedding(c.num_labels, c.width, c.num_condition_tokens, c.class_dropout)
        self.token_embedding = nn.Embedding(self.K * self.V, c.width)   # codebook k's code v at row k·V + v
        self.blocks = nn.ModuleList(Block(c.width, c.heads, c.hidden, c.norm_eps) for _ in range(c.depth))
        self.norm = nn.RMSNorm(c.width, eps=c.norm_eps)
        self.head = SequentialCodebookHead(c) if c.head == "sequential" else IndependentHeads(c)
        cos, sin = grid_rotary_tables(c)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    # -- pieces -------------------------------------------------------------------------------------
    def check_ids(self, ids: torch.Tensor) -> None:
        if ids.dim() != 3 or ids.shape[1] != self.K or ids.shape[2] != self.L:
            raise ValueError(f"expected ids [B, {self.K}, {self.L}] (grid {self.config.grid}), got {tuple(ids.shape)}: "
                             f"the token cache's grid or codebook count differs from the generator's")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.V):
            raise ValueError(f"ids must lie in [0, {self.V}), got [{int(ids.min())}, {int(ids.max())}]")

    def embed_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, K, T] → position inputs [B, T, D]: the sum of the K per-codebook embeddings."""
        offsets = (torch.arange(self.K, device=ids.device) * self.V)[None, :, None]
        return self.token_embedding(ids + offsets).sum(dim=1)

    def trunk(self, x: torch.Tensor, start: int = 0, caches: Optional[List[KVCache]] = None) -> torch.Tensor:
        """Trunk inputs [B, T, D] at input indices start..start+T-1 → final-normed states [B, T, D]."""
        T = x.shape[1]
        rotary = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
        for i, block in enumerate(self.blocks):
            x = block(x, rotary, None if caches is None else caches[i], start)
        return self.norm(x)

    def condition_tokens(self, labels: torch.Tensor) -> torch.Tensor:
        return self.condition(labels)

    # -- training -----------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """ids [B, K, L] int64 in [0, V), labels [B] (null label = num_labels) → logits [B, L, K, V].

        Class dropout is the caller's: pass ``model.condition.drop_labels(labels)`` while training.
        """
        self.check_ids(ids)
        x = torch.cat([self.condition_tokens(labels), self.embed_positions(ids[:, :, :-1])], dim=1)
        state = self.trunk(x)[:, self.nc - 1:]                                      # [B, L, D]
        return self.head(state, ids)

    def loss(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy (nats per code) over all positions and codebooks."""
        logits = self(ids, labels)
        return F.cross_entropy(logits.float().flatten(0, 2), ids.permute(0, 2, 1).flatten())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_generator(config: ARConfig) -> ARGenerator:
    return ARGenerator(config)


def count_training_flops(model: ARGenerator, sample_ids: torch.Tensor, sample_labels: torch.Tensor) -> int:
    """FLOPs of one forward + backward on the given batch, counted by torch.utils.flop_counter as it runs."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model.loss(sample_ids, sample_labels).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


GENERATOR_FORMAT = "meditok-ar-generator-v1"


def generator_payload(model: ARGenerator, **extra: Any) -> Dict[str, Any]:
    """What a generator checkpoint holds: format, config, weights (+ anything in ``extra``)."""
    return {"format": GENERATOR_FORMAT, "config": model.config.to_dict(),
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra}


def load_generator(path, preset: Optional[str] = None, device="cpu", weights: str = "auto") -> Tuple[ARGenerator, Dict[str, Any]]:
    """Load a generator saved by the trainer (``ckpt-*.pth`` or ``generator.pth``).

    Args:
        preset: when given, the checkpoint must be of this preset (else a clear error).
        weights: 'ema' (the EMA weights; error if none), 'model', or 'auto' (EMA when present).

    Returns (model in eval mode, the checkpoint dict without the weights).
    """
    from pathlib import Path

    import meditok

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: generator checkpoint not found")
    payload = meditok.safe_load(path, formats=(GENERATOR_FORMAT,), what="generator checkpoint of this project")
    config = ARConfig.from_dict(payload["config"])
    if preset is not None and preset != config.preset:
        raise ValueError(f"{path}: the checkpoint is a {config.preset!r} generator, not {preset!r}; "
                         f"pass --preset {config.preset} (or leave it unset)")
    if weights == "ema" and payload.get("ema") is None:
        raise ValueError(f"{path}: holds no EMA weights (trained without --ema); use weights='model'")
    state = payload["ema"] if weights == "ema" or (weights == "auto" and payload.get("ema") is not None) else payload["model"]
    model = ARGenerator(config)
    model.load_state_dict(state, strict=True)
    info = {k: v for k, v in payload.items() if k not in ("model", "ema", "optimizer")}
    return model.to(device).eval(), info
