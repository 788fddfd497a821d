"""Write the tiny randomly initialised loss/teacher networks used by the tests and the CPU quick start.

    python scripts/make_tiny_networks.py                 # → external/tiny/{biomedclip,dinov2}
    python scripts/make_tiny_networks.py --out /tmp/tiny

Writes, deterministically for a given --seed (a few seconds, ≈ 2.3 MB in all):

  <out>/biomedclip/  BiomedCLIP folder layout (open_clip_config.json, open_clip_pytorch_model.bin, BERT
                     config.json, tokenizer files): timm `test_vit` image tower (64-d features) + 2-layer BERT
                     text tower (32-d output, context 256, small WordPiece vocabulary).
                     Load: local_openclip.load_vision_teacher("tiny") / load_text_teacher("tiny").
  <out>/dinov2/      timm local-dir layout (config.json, model.safetensors): DINOv2-family ViT, patch 14,
                     width 32, 12 blocks. Load: tokenizer_training.discriminator.build_discriminator("tiny").

No VGG16 file is written: a random VGG16 is 528 MB. Use tokenizer_training.perceptual.build_lpips("random") instead
(same lpips network, seeded random backbone). None of these networks is pretrained: their outputs are
meaningless, they only exercise the real code paths. Real weights: see external/README.md.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from local_openclip.constants import TINY_BIOMEDCLIP_NAME, TINY_DIR, TINY_DINO_NAME, default_location


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Write tiny random BiomedCLIP-layout and DINOv2-layout networks for tests and the CPU quick "
                    "start (not pretrained; real weights: external/README.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=default_location(TINY_DIR),
                        help="output folder (MEDITOK_TINY / MEDITOK_EXTERNAL change the default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initial weights")
    parser.add_argument("--only", choices=("biomedclip", "dinov2"), default=None, help="write just one of them")
    parser.add_argument("--full-size", action="store_true",
                        help="the real architectures (BiomedCLIP ViT-B/16 + BERT-base, DINOv2 ViT-S/14) with random "
                             "weights, ~900 MB: for GPU speed/memory benchmarks offline, never for training")
    args = parser.parse_args(argv)

    from local_openclip.tiny import make_tiny_biomedclip
    from tokenizer_training.discriminator import make_tiny_dino

    out = Path(args.out)
    jobs = [("biomedclip", TINY_BIOMEDCLIP_NAME, make_tiny_biomedclip), ("dinov2", TINY_DINO_NAME, make_tiny_dino)]
    for label, name, make in jobs:
        if args.only and args.only != label:
            continue
        start = time.perf_counter()
        target = make(out / name, seed=args.seed, full_size=args.full_size)
        print(f"[{label}] {target}  {folder_size(target) / 1e6:.2f} MB  ({time.perf_counter() - start:.1f} s)")
    print("LPIPS: no file written; use vgg_path='random' (tokenizer_training.perceptual.build_lpips) for tiny runs.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
