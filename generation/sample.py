"""Sampling from an :class:`~generation.ar_model.ARGenerator`: static KV cache, temperature / top-k / top-p
(:mod:`generation.sampling`), classifier-free guidance (:mod:`generation.guidance`), seeded; and the CLI that
decodes samples with the tokenizer.

Example::

    python -m generation.sample --generator runs/synthesis_tiny/generator.pth --per-label 16 --out runs/synthesis_tiny/samples
    python -m generation.sample --generator runs/ar_B/generator.pth --labels bloodmnist dermamnist --per-label 1000 \\
        --batch-size 128 --cfg-scale 1.5 --top-k 0 --out samples/

Writes ``OUT/grid_<label>.png`` (one grid per label, the label's name in a strip above it),
``OUT/samples.npz`` (``images`` uint8 [N, H, W, 3], ``ids`` uint16 [N, 8, L], ``labels`` int64 [N],
``label_names``), written atomically (never a partial file), and prints images/s and generated tokens/s.

Randomness: one uniform number per (image, position, codebook) is drawn from a ``torch.Generator``
seeded with ``--seed``, in the same order with or without the KV cache, so the cache changes speed,
not samples.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .ar_model import ARGenerator, KVCache, load_generator
from .guidance import cfg_combine, guidance_on
# choosing a code: shared with the diffusion sampler (generation/sampling.py)
from .sampling import check_sampling_args, choose


# --------------------------------------------------------------------------------------------------
# Generation

class _Trunk:
    """Runs the generator's trunk step by step, with a static KV cache or by full recomputation."""

    def __init__(self, model: ARGenerator, batch: int, use_cache: bool, dtype: torch.dtype):
        self.model, self.use_cache = model, use_cache
        c = model.config
        self.caches = ([KVCache(batch, c.heads, model.nc + model.L - 1, c.width // c.heads, model.rope_cos.device, dtype)
                        for _ in range(c.depth)] if use_cache else None)
        self.inputs: List[torch.Tensor] = []
        self.length = 0

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """Append inputs [B, T, D]; return the state [B, D] after the last one."""
        if self.use_cache:
            state = self.model.trunk(x, start=self.length, caches=self.caches)
        else:
            self.inputs.append(x)
            state = self.model.trunk(torch.cat(self.inputs, dim=1))
        self.length += x.shape[1]
        return state[:, -1]


@torch.inference_mode()
def generate(model: ARGenerator, labels: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, cfg_scale: Optional[float] = None, generator: Optional[torch.Generator] = None,
             use_cache: bool = True, amp_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Sample ids for the given labels.

    Args:
        labels: [B] int64 label ids (0..num_labels-1; num_labels = the null label, i.e. unconditional).
        temperature, top_k, top_p: as usual (temperature 1, no top-k / top-p = the paper's setting).
        cfg_scale: None or 1.0 = no guidance (the paper; one pass); else ``uncond + s·(cond − uncond)`` at every
            code (s >= 0; :mod:`generation.guidance`).
        generator: torch.Generator on the model's device for the uniform draws (seeded by the caller).
        use_cache: static KV cache (default) or full recomputation at every position (same ids).
        amp_dtype: e.g. torch.bfloat16 to run under autocast on GPU.

    Returns:
        ids [B, K, L] int64 in [0, codebook_size).
    """
    check_sampling_args(temperature, top_k, top_p, cfg_scale)
    device = model.rope_cos.device
    labels = labels.to(device)
    model.condition.check(labels)
    B, K, L = labels.shape[0], model.K, model.L
    guided = guidance_on(cfg_scale)
    trunk_labels = torch.cat([labels, torch.full_like(labels, model.condition.null_label)]) if guided else labels
    ids = torch.zeros(B, K, L, dtype=torch.long, device=device)
    with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        trunk = _Trunk(model, trunk_labels.shape[0], use_cache, amp_dtype or model.rope_cos.dtype)
        state = trunk.step(model.condition_tokens(trunk_labels))
        for t in range(L):
            uniform = torch.rand(K, B, generator=generator, device=device)
            codes = torch.zeros(B, 0, dtype=torch.long, device=device)
            for k in range(K):
                both = codes.repeat(2, 1) if guided else codes
                logits = model.head.codebook_logits(state, both, k).float()
                if guided:
                    logits = cfg_combine(logits[:B], logits[B:], cfg_scale)
                code = choose(logits, uniform[k], temperature, top_k, top_p)
                codes = torch.cat([codes, code[:, None]], dim=1)
            ids[:, :, t] = codes
            if t + 1 < L:
                step_ids = ids[:, :, t:t + 1]
                state = trunk.step(model.embed_positions(step_ids.repeat(2, 1, 1) if guided else step_ids))
    return ids


# --------------------------------------------------------------------------------------------------
# Images and files

def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] → uint8 [B, H, W, 3] (round((x + 1)·127.5), as evaluation quantises)."""
    return images.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: np.ndarray, path: Path, columns: int = 8, min_tile: int = 64,
              title: Optional[str] = None) -> Path:
    """uint8 [N, H, W, 3] → one PNG grid (tiles enlarged by nearest neighbour when smaller than ``min_tile``),
    with ``title`` written in a strip above it (:func:`generation.figures.captioned_grid`, which gives the size)."""
    from .figures import captioned_grid

    tiles = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return captioned_grid(tiles, None, title, path, columns=columns, min_tile=min_tile)


def save_npz_atomically(path: Path, **arrays) -> Path:
    """``np.savez`` through :func:`meditok.atomic_write`: a crash never leaves a partial .npz."""
    from meditok import atomic_write
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


@torch.inference_mode()
def decode(tokenizer, ids: torch.Tensor, grid, batch_size: int = 32) -> torch.Tensor:
    """ids [N, K, L] → images [N, 3, 16h, 16w] in [-1, 1] (CPU float32), decoded in batches."""
    out = []
    for start in range(0, ids.shape[0], batch_size):
        out.append(tokenizer.idx_to_img(ids[start:start + batch_size], grid=tuple(grid)).float().cpu())
    return torch.cat(out)


def sample_labels(model: ARGenerator, label_names: Sequence[str], requested: Optional[Sequence[str]],
                  per_label: int, source: str) -> torch.Tensor:
    """Label ids for ``per_label`` images of each requested label name (default: every label)."""
    names = list(requested) if requested else list(label_names)
    unknown = [n for n in names if n not in label_names]
    if unknown:
        raise ValueError(f"{source}: label(s) {unknown} unknown to the generator; it was trained on {list(label_names)}")
    return torch.tensor([label_names.index(n) for n in names for _ in range(per_label)], dtype=torch.long)


def run_sampling(model: ARGenerator, tokenizer, labels: torch.Tensor, label_names: Sequence[str], out: Path, *,
                 batch_size: int = 64, seed: int = 0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 cfg_scale: Optional[float] = None, amp_dtype=None, grid_columns: int = 8, progress: bool = True,
                 write_npz: bool = True) -> Dict[str, float]:
    """Generate, decode, write per-label grids and samples.npz; returns timing numbers."""
    from tqdm import tqdm

    device = model.rope_cos.device
    generator = torch.Generator(device=device).manual_seed(seed)
    all_ids, seconds_generating = [], 0.0
    for start in tqdm(range(0, len(labels), batch_size), desc="sampling", unit="batch", disable=not progress):
        batch = labels[start:start + batch_size]
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        all_ids.append(generate(model, batch, temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale,
                                generator=generator, amp_dtype=amp_dtype).cpu())
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds_generating += time.perf_counter() - began
    ids = torch.cat(all_ids)
    images = to_uint8(decode(tokenizer, ids.to(tokenizer.device), model.config.grid))
    for label in labels.unique().tolist():
        rows = (labels == label).nonzero().flatten().numpy()
        shown = min(len(rows), 64)
        title = f"{label_names[label]}: " + (f"{shown} samples" if shown == len(rows) else
                                            f"first {shown} of {len(rows)} samples")
        save_grid(images[rows[:64]], out / f"grid_{label_names[label]}.png", columns=grid_columns, title=title)
    if write_npz:
        save_npz_atomically(out / "samples.npz", images=images, ids=ids.numpy().astype(np.uint16),
                            labels=labels.numpy(), label_names=np.array(list(label_names)))
    n = len(labels)
    return {"images": n, "seconds": seconds_generating, "images_per_s": n / max(seconds_generating, 1e-9),
            "tokens_per_s": n * model.K * model.L / max(seconds_generating, 1e-9)}


# --------------------------------------------------------------------------------------------------
# CLI

def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m generation.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", required=True, help="generator checkpoint (RUN/generator.pth or RUN/ckpt-*.pth)")
    parser.add_argument("--preset", default=None, help="refuse a checkpoint of another preset (tiny, B, L, XL)")
    parser.add_argument("--weights", default="auto", choices=["auto", "ema", "model"], help="EMA or raw weights (auto: EMA if saved)")
    parser.add_argument("--tokenizer", default=None, metavar="SOURCE",
                        help="tokenizer to decode with (default: the one the generator's token cache was made with)")
    parser.add_argument("--allow-other-tokenizer", action="store_true",
                        help="decode even if the tokenizer's fingerprint differs from the training cache's (images are then meaningless)")
    parser.add_argument("--labels", nargs="+", default=None, help="label names to sample (default: all the generator knows)")
    parser.add_argument("--per-label", type=int, default=16, help="images per label (default 16)")
    parser.add_argument("--batch-size", type=int, default=64, help="images generated at once (default 64)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1, the paper's)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely codes (0 = off, default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off, default)")
    parser.add_argument("--cfg-scale", type=float, default=None,
                        help="classifier-free guidance scale >= 0 (default off, as in the paper; 1 = off too, 0 = unconditional)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--out", required=True, help="folder for grid_<label>.png and samples.npz")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-bf16", action="store_true", help="on GPU, sample in float32 instead of bf16 autocast")
    return parser.parse_args(argv)


def load_decoder(info: Dict, requested: Optional[str], allow_other: bool, device: torch.device, generator_path: str):
    """The tokenizer that decodes samples; refuses one whose fingerprint differs from the training cache's."""
    import meditok

    from .token_cache import tokenizer_fingerprint

    cache = info.get("token_cache", {})
    source = requested or cache.get("tokenizer_source")
    if not source:
        raise ValueError(f"{generator_path}: the checkpoint does not say which tokenizer made its tokens; pass --tokenizer SOURCE")
    tokenizer = meditok.load_meditok(source, device=device).eval()
    expected = cache.get("tokenizer_fingerprint")
    actual = tokenizer_fingerprint(tokenizer)
    if expected and actual != expected and not allow_other:
        raise ValueError(f"{source}: tokenizer {actual[:16]} is not the one the generator's tokens came from "
                         f"({expected[:16]}, {cache.get('tokenizer_source')}); pass the right --tokenizer "
                         f"(or --allow-other-tokenizer to decode anyway)")
    return tokenizer


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        check_sampling_args(args.temperature, args.top_k, args.top_p, args.cfg_scale)
        device = torch.device(args.device)
        model, info = load_generator(args.generator, preset=args.preset, device=device, weights=args.weights)
        label_names = info.get("label_names") or [str(i) for i in range(model.config.num_labels)]
        labels = sample_labels(model, label_names, args.labels, args.per_label, args.generator)
        tokenizer = load_decoder(info, args.tokenizer, args.allow_other_tokenizer, device, args.generator)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    stats = run_sampling(model, tokenizer, labels, label_names, out, batch_size=args.batch_size, seed=args.seed,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, cfg_scale=args.cfg_scale,
                         amp_dtype=torch.bfloat16 if device.type == "cuda" and not args.no_bf16 else None)
    (out / "sampling.json").write_text(json.dumps({**stats, "generator": args.generator, "seed": args.seed,
                                                   "temperature": args.temperature, "top_k": args.top_k,
                                                   "top_p": args.top_p, "cfg_scale": args.cfg_scale,
                                                   "device": str(device)}, indent=2) + "\n")
    print(f"{stats['images']} images in {stats['seconds']:.1f} s: {stats['images_per_s']:.2f} images/s, "
          f"{stats['tokens_per_s']:.0f} tokens/s (8 codes per position) → {out}/grid_*.png, {out}/samples.npz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
