"""Print each preset's size: parameters per part, token grid, vocabulary and forward FLOPs per image.

    python -m meditok.info              # all presets, Markdown table
    python -m meditok.info large --json # one preset, machine-readable

Models are built on the meta device, so this needs no memory and no weights.
"""
from __future__ import annotations

import argparse
import contextlib
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


def saved_activation_bytes(model: MedITok, images: torch.Tensor, dtype: Optional[torch.dtype] = None) -> int:
    """Bytes of the tensors a training forward pass (``model(images)``, under ``dtype`` autocast when given) keeps
    for the backward pass: what gradient checkpointing trades for recomputation. Counted through
    ``torch.autograd.graph.saved_tensors_hooks``, each storage once; the parameters themselves are not counted
    (their autocast copies are). Works on the meta device (float32 only: autocast has no meta backend)."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage._cdata not in params:
            seen[storage._cdata] = max(seen.get(storage._cdata, 0), storage.nbytes())
        return t

    cast = torch.autocast(images.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), cast:
        model(images)
    return sum(seen.values())


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
    parser.add_argument("--activations", action="store_true",
                        help="also: activation memory kept for the backward pass per image, per gradient-checkpointing "
                             "setting (float32, counted on the meta device; bf16 autocast keeps ≈ 0.52-0.58 of it)")
    parser.add_argument("--budget-batch", type=int, default=64,
                        help="with --activations: the per-GPU batch of the memory budget lines (default 64, the paper's)")
    parser.add_argument("--budget-gb", type=float, default=80.0,
                        help="with --activations: GPU memory the budget is checked against (default 80, an H100)")
    args = parser.parse_args(argv)
    unknown = [p for p in args.presets if p not in PRESETS]
    if unknown:
        parser.error(f"unknown preset(s) {unknown}; choose among {list(PRESETS)}")
    rows = [preset_info(p, args.img_size) for p in (args.presets or list(PRESETS))]
    if args.activations:
        for row in rows:
            row["activation_mib_per_image_fp32"] = activations_per_checkpointing(row["preset"], row["img_size"])
    print(json.dumps(rows, indent=2) if args.json else markdown_table(rows))
    if args.activations and not args.json:
        print("\nActivation memory kept for the backward pass, MiB per image (float32; `--grad-ckpt-parts`):\n")
        settings = ("none",) + MedITok.CHECKPOINT_PARTS
        print("| preset | img | " + " | ".join(s if s != "none" else "no checkpointing" for s in settings) + " |")
        print("|---|---|" + "---|" * len(settings))
        for r in rows:
            a = r["activation_mib_per_image_fp32"]
            print(f"| {r['preset']} | {r['img_size']} | " + " | ".join(f"{a[s]:.0f}" for s in settings) + " |")
        for r in rows:
            print("\n" + memory_budget_lines(r, batch=args.budget_batch, gpu_gb=args.budget_gb))
    return 0


#: Calibration of the budget below on two peaks measured on one H200 (bf16, `large`, 256 px, batch 64, every
#: loss; docs/performance.md): 107.8 GB without checkpointing and 69.7 GB with ``vit``. Their difference over the
#: float32 bytes counted here (2,332 − 1,215 MiB per image) gives the fraction of those bytes bf16 autocast keeps;
#: what the no-checkpointing peak has beyond the tokenizer's states and activations is the loss networks'
#: weights and activations, cuDNN/cuBLAS workspaces and allocator slack.
BF16_ACTIVATION_FRACTION = 0.51
LOSS_NETWORKS_AND_SLACK_GB = 17.0


def memory_budget(parameters: int, activation_mib_per_image: float, batch: int) -> Dict[str, float]:
    """GB (10^9 B) of one training rank: float32 weights, gradients and Adam's two moments (16 B per trainable
    parameter), bf16 activations for ``batch`` images (float32 bytes × ``BF16_ACTIVATION_FRACTION``) and the
    calibrated rest (``LOSS_NETWORKS_AND_SLACK_GB``)."""
    states = 16 * parameters / 1e9
    activations = activation_mib_per_image * 2 ** 20 * BF16_ACTIVATION_FRACTION * batch / 1e9
    return {"weights_grads_adam_gb": states, "activations_gb": activations, "other_gb": LOSS_NETWORKS_AND_SLACK_GB,
            "total_gb": states + activations + LOSS_NETWORKS_AND_SLACK_GB}


def memory_budget_lines(row: Dict[str, object], batch: int = 64, gpu_gb: float = 80.0) -> str:
    """One line per checkpointing setting: does a batch of ``batch`` fit ``gpu_gb``?"""
    params = row["parameters"]["total"]
    lines = [f"Memory per GPU at batch {batch} ({row['preset']}, {row['img_size']} px): weights + grads + Adam "
             f"moments (fp32, 16 B × {params / 1e6:.0f} M parameters) + bf16 activations ({BF16_ACTIVATION_FRACTION} "
             f"× float32) + loss networks and slack ({LOSS_NETWORKS_AND_SLACK_GB:g} GB, calibrated on `large`):"]
    for setting, mib in row["activation_mib_per_image_fp32"].items():
        b = memory_budget(params, mib, batch)
        verdict = "fits" if b["total_gb"] <= gpu_gb else "does NOT fit"
        lines.append(f"  {setting:>26}: {b['weights_grads_adam_gb']:.1f} + {b['activations_gb']:.1f} + "
                     f"{b['other_gb']:.0f} = {b['total_gb']:.1f} GB -> {verdict} {gpu_gb:g} GB at batch {batch}")
    return "\n".join(lines)


def activations_per_checkpointing(preset: str, img_size: int) -> Dict[str, float]:
    """MiB per image kept for backward (float32, meta device): batch 2 minus batch 1, so that batch-independent
    tensors (codebooks, autocast weight copies) drop out; for each gradient-checkpointing setting."""
    model = build_meditok(preset, empty=True, img_size=img_size).train()
    x = torch.empty(2, 3, img_size, img_size, device="meta")
    out = {}
    for parts in ("none",) + MedITok.CHECKPOINT_PARTS:
        model.set_grad_checkpointing(parts != "none", parts if parts != "none" else "all")
        out[parts] = (saved_activation_bytes(model, x) - saved_activation_bytes(model, x[:1])) / 2 ** 20
    return out


if __name__ == "__main__":
    sys.exit(main())
