"""The tokenizer under evaluation: command-line arguments, loading, and one encode pass for all metrics."""
from __future__ import annotations

import argparse
import hashlib
from typing import Any, Dict, Optional, Tuple

import torch

import meditok
from meditok.model import MedITok
from meditok.quantizer import autocast_off

RANDOM_WEIGHTS_WARNING = (
    "THE TOKENIZER HAS RANDOM WEIGHTS (--random-weights): a smoke test of the pipeline only; "
    "its numbers say nothing about MedITok"
)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_tokenizer_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--checkpoint", default=None, metavar="SOURCE",
                       help="MedITok weights: the released weights/meditok_simple_v1.pth, a training checkpoint, a "
                            "folder written by meditok.save_meditok, or a Hub id (see weights/README.md)")
    group.add_argument("--preset", default=None, choices=sorted(meditok.PRESETS),
                       help="preset to build: with --random-weights (default tiny), or to force one for --checkpoint")
    group.add_argument("--random-weights", action="store_true",
                       help="use a randomly initialised preset instead of a checkpoint (smoke tests only: the "
                            "results are labelled as meaningless)")
    group.add_argument("--seed", type=int, default=0, metavar="N", help="seed for random weights and probes (default 0)")
    group.add_argument("--device", default=default_device(), help="cuda or cpu (default: cuda when available)")


def load_tokenizer(args: argparse.Namespace) -> Tuple[MedITok, Dict[str, Any]]:
    """Build or load the tokenizer the arguments name; returns (model in eval mode, description for the outputs)."""
    if args.checkpoint and args.random_weights:
        raise SystemExit("error: pass either --checkpoint or --random-weights, not both")
    if not args.checkpoint and not args.random_weights:
        raise SystemExit("error: no tokenizer given. Pass --checkpoint weights/meditok_simple_v1.pth (see "
                         "weights/README.md for the download), or --preset tiny --random-weights for a smoke test.")
    device = torch.device(args.device)
    if args.random_weights:
        preset = args.preset or "tiny"
        torch.manual_seed(args.seed)
        model = meditok.build_meditok(preset, device=device)
        description = {"source": f"random weights, preset {preset}, seed {args.seed}", "preset": preset,
                       "random_weights": True, "warning": RANDOM_WEIGHTS_WARNING}
    else:
        try:
            model = meditok.load_meditok(args.checkpoint, preset=args.preset, device=device)
        except meditok.CheckpointError as error:
            raise SystemExit(f"error: {error}") from None
        description = {"source": str(args.checkpoint), "preset": model.config.preset, "random_weights": False}
    model.eval().requires_grad_(False)
    description["native_img_size"] = model.config.img_size
    return model, description


def tokenizer_fingerprint(model: MedITok) -> str:
    """SHA-1 of the weights that token ids and pooled features depend on (encoder to post-quant projection),
    so cached features are recomputed whenever those weights change and reused when only the decoder does."""
    digest = hashlib.sha1()
    for part in (model.encoder, model.quant_proj, model.quantizer, model.post_quant_proj):
        for name, tensor in sorted(part.state_dict().items()):
            if name.endswith("vocab_usage"):  # usage statistics, not weights
                continue
            digest.update(name.encode())
            digest.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


@torch.inference_mode()
def encode_for_evaluation(model: MedITok, images: torch.Tensor, reconstruct: bool = True) -> Dict[str, torch.Tensor]:
    """One encoder pass giving everything the evaluations use.

    Args:
        images: [B, 3, H, W] in [-1, 1], H and W multiples of 16, on the model's device.

    Returns a dict (on the model's device):
        ``ids``: [B, 8, L] int64 token ids (L = H/16 · W/16);
        ``grid``: [B, L·64] float32, the quantised token grid flattened position-major (each 8-d chunk a
        unit-norm codeword), i.e. ``encode_image_vq(images).flatten(1)``;
        ``pooled``: [B, vit_width] float32, the post-quantisation tokens averaged over the grid (the
        vector the alignment head reads);
        ``reconstruction``: [B, 3, H, W] in [-1, 1] when ``reconstruct``, equal to
        ``img_to_reconstructed_img(images)``.
    """
    latent, grid_shape = model.encode_latent(images)
    with autocast_off(latent):
        ids = model.quantizer.f_to_idx(latent)
        quantized = model.quantizer.idx_to_f(ids)
        tokens = model.post_quant_proj(quantized)
    out = {"ids": ids, "grid": quantized.flatten(1), "pooled": tokens.mean(dim=1).float()}
    if reconstruct:
        out["reconstruction"] = model.decoder(tokens, grid_shape).float().clamp(-1, 1)
    return out


def grid_features_from_ids(ids: torch.Tensor, normalized_codebooks: torch.Tensor) -> torch.Tensor:
    """Token ids → the flattened quantised grid, without the model (for cached ids).

    Args:
        ids: [B, K, L] integer ids (K codebooks). normalized_codebooks: [K, V, D] unit-norm codewords
            (``model.quantizer.normalized_codebooks()``).

    Returns:
        float32 [B, L·K·D], the same layout as :func:`encode_for_evaluation`'s ``grid``.
    """
    ids = ids.long()
    normalized_codebooks = normalized_codebooks.detach()
    codebook_index = torch.arange(ids.shape[1], device=ids.device)[None, :, None]
    chunks = normalized_codebooks[codebook_index, ids]          # [B, K, L, D]
    return chunks.permute(0, 2, 1, 3).flatten(1).float()        # [B, L, K, D] → [B, L·K·D]


def labelled_warnings(*descriptions: Optional[Dict[str, Any]]) -> list:
    """The loud warnings (random tokenizer, random Inception) to repeat at the top of every output."""
    return [d["warning"] for d in descriptions if d and d.get("warning")]
