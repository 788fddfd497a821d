"""Print each preset's size: parameters per part, token grid, vocabulary and forward FLOPs per image.

    python -m meditok.info              # all presets, Markdown table
    python -m meditok.info large --json # one preset, machine-readable

Models are built on the meta device, so this needs no memory and no weights.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from .checkpoint import build_meditok
from .config import PRESETS
from .model import MedITok

PARTS = {
    "encoder_conv": lambda m: [m.encoder.patch_embed],
    "encoder_vit": lambda m: [m.encoder.blocks, m.encoder.norm],
    "quant_proj": lambda m: [m.quant_proj],
    "codebooks": lambda m: [m.quantizer],
    "post_quant_proj": lambda m: [m.post_quant_proj],
    "decoder_vit": lambda m: [m.decoder.blocks, m.decoder.norm],
    "decoder_conv": lambda m: [m.decoder.up_conv1, m.decoder.up_conv2, m.decoder.up_conv3, m.decoder.up_conv4],
    "alignment_head": lambda m: [m.fc_norm, m.projection],
}


def count_parameters(model: MedITok) -> Dict[str, int]:
    """Parameters per part (frozen ``encoder.pos_embed`` and ``logit_scale`` counted in ``other``)."""
    counts = {name: sum(p.numel() for mod in get(model) for p in mod.parameters()) for name, get in PARTS.items()}
    total = sum(p.numel() for p in model.parameters())
    counts["other"] = total - sum(counts.values())
    counts["total"] = total
    return counts


def forward_flops(model: MedITok, img_size: int) -> Dict[str, float]:
    """FLOPs (multiply-add = 2) per image of tokenization (encoder + quant_proj) and decoding
    (post_quant_proj + decoder), counted by torch.utils.flop_counter on the meta device."""
    if model.device.type != "meta":  # count on a weightless twin: no compute, no memory
        model = build_meditok(model.config, empty=True)
    x = torch.empty(1, 3, img_size, img_size, device="meta")
    with torch.no_grad():
        with FlopCounterMode(display=False) as enc:
            z, grid = model.encode_latent(x)
        with FlopCounterMode(display=False) as dec:
            model.decode_latent(torch.empty_like(z), grid)
    return {"encode": float(enc.get_total_flops()), "decode": float(dec.get_total_flops())}


def preset_info(preset: str, img_size: Optional[int] = None) -> Dict[str, object]:
    model = build_meditok(preset, empty=True)
    cfg = model.config
    size = img_size or cfg.img_size
    h, w = cfg.token_grid(size)
    flops = forward_flops(model, size)
    return {
        "preset": preset,
        "img_size": size,
        "token_grid": [cfg.num_codebooks, h, w],
        "tokens_per_image": cfg.num_codebooks * h * w,
        "vocabulary": f"{cfg.num_codebooks} x {cfg.codebook_size} (= {cfg.vocab_size})",
        "parameters": count_parameters(model),
        "gflops_encode": flops["encode"] / 1e9,
        "gflops_decode": flops["decode"] / 1e9,
    }


def markdown_table(rows: List[Dict[str, object]]) -> str:
    def m(n: int) -> str:
        return f"{n / 1e6:.2f} M"
    head = ("| preset | img | token ids | vocabulary | encoder conv | encoder ViT | bottleneck | decoder ViT | "
            "decoder conv | align head | **total** | GFLOPs enc / dec |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        p = r["parameters"]
        bottleneck = p["quant_proj"] + p["codebooks"] + p["post_quant_proj"]
        lines.append(
            f"| {r['preset']} | {r['img_size']} | {r['token_grid'][0]}×{r['token_grid'][1]}×{r['token_grid'][2]} | "
            f"{r['vocabulary']} | {m(p['encoder_conv'])} | {m(p['encoder_vit'])} | {m(bottleneck)} | "
            f"{m(p['decoder_vit'])} | {m(p['decoder_conv'])} | {m(p['alignment_head'])} | **{m(p['total'])}** | "
            f"{r['gflops_encode']:.1f} / {r['gflops_decode']:.1f} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meditok.info", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("presets", nargs="*", metavar="PRESET",
                        help=f"presets to describe, among {', '.join(PRESETS)} (default: all)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="input resolution for token grid and FLOPs (default: each preset's own)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    args = parser.parse_args(argv)
    unknown = [p for p in args.presets if p not in PRESETS]
    if unknown:
        parser.error(f"unknown preset(s) {unknown}; choose among {list(PRESETS)}")
    rows = [preset_info(p, args.img_size) for p in (args.presets or list(PRESETS))]
    print(json.dumps(rows, indent=2) if args.json else markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
