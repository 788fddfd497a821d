"""Reconstruct medical images with a MedITok tokenizer and look at the result.

    python demo.py                                   # the validation examples, the best checkpoint found
    python demo.py scan.dcm slice.png --modality ct  # your own files (PNG/JPEG, 16-bit PNG, DICOM, NIfTI)
    python demo.py --checkpoint weights/meditok_simple_v1.pth --img-size 256

Checkpoint by default: the released weights under weights/ if present, else the quick-start output
(runs/stage2_tiny, then runs/stage1_tiny), else a message saying how to get one. For each image it
writes ``<out>/<name>.png`` (input | reconstruction | error map, with PSNR and SSIM) and a
``summary.png`` grid, and prints the token-id shape and the metrics. PSNR/SSIM: images in [0, 1] after
uint8 quantisation of both sides, data range 1 (see docs/evaluation.md).
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

import meditok

ROOT = Path(__file__).resolve().parent
DEFAULT_CSV = ROOT / "datasets/meta/examples_val.csv"
DEFAULT_ROOT = ROOT / "datasets/examples"
CANDIDATES = (
    ROOT / "weights/meditok_simple_v1.pth",
    ROOT / "weights/meditok/meditok_simple_v1.pth",
    ROOT / "weights/meditok_ckpt_v1.pth",
    ROOT / "runs/stage2_tiny/tokenizer",
    ROOT / "runs/stage1_tiny/tokenizer",
)


def find_checkpoint(explicit: Optional[str] = None) -> Path:
    """The checkpoint to use: ``explicit``, else the first of CANDIDATES that exists."""
    if explicit:
        return Path(explicit)
    for cand in CANDIDATES:
        if cand.exists():
            return cand
    raise SystemExit(
        "No MedITok checkpoint found. Either\n"
        "  * download the released weights: hf download massaki75/meditok meditok_simple_v1.pth --local-dir weights\n"
        "    (see weights/README.md), or\n"
        "  * train the tiny try-out: bash scripts/train_stage1.sh && bash scripts/train_stage2.sh\n"
        "then run `python demo.py` again, or pass --checkpoint PATH.")


def default_images() -> List[Tuple[Path, str]]:
    with open(DEFAULT_CSV, newline="") as f:
        return [(DEFAULT_ROOT / row["identifier"], row["modality"]) for row in csv.DictReader(f)]


def quality(original: torch.Tensor, recon: torch.Tensor) -> Tuple[float, float]:
    """PSNR (dB) and SSIM of one image pair [3, H, W] in [-1, 1], with the evaluation suite's conventions:
    both sides quantised to uint8 and compared in [0, 1], data range 1, scikit-image SSIM (docs/evaluation.md)."""
    from evaluation.metrics import psnr, quantize_to_unit, ssim
    a, b = quantize_to_unit(original[None]), quantize_to_unit(recon[None])
    return float(psnr(a, b)[0]), float(ssim(a, b)[0])


def save_figure(original: torch.Tensor, recon: torch.Tensor, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    to_img = lambda t: t.clamp(-1, 1).add(1).div(2).permute(1, 2, 0).cpu().numpy()
    err = (original - recon).abs().mean(0).div(2).cpu().numpy()
    fig, axes = plt.subplots(1, 3, figsize=(9.6, 3.6))
    axes[0].imshow(to_img(original)); axes[0].set_title("input")
    axes[1].imshow(to_img(recon)); axes[1].set_title("reconstruction")
    im = axes[2].imshow(err, cmap="magma", vmin=0, vmax=max(0.05, float(err.max()))); axes[2].set_title("|error| (0–1 scale)")
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(images: Sequence[Tuple[Path, str]], checkpoint: Path, out_dir: Path, img_size: Optional[int] = None,
        device: str = "cpu") -> List[dict]:
    from meditok.data import eval_transform, read_image
    model = meditok.load_meditok(checkpoint, device=device)
    size = img_size or model.config.img_size
    transform = eval_transform(size)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"checkpoint: {checkpoint} (preset {model.config.preset}); images at {size}×{size}; output: {out_dir}")
    results, pairs = [], []
    for path, modality in images:
        x = transform(read_image(path, modality=modality or None)).unsqueeze(0).to(device)
        with torch.no_grad():
            ids = model.img_to_idx(x)
            recon = model.idx_to_img(ids)
        psnr, ssim = quality(x[0], recon[0])
        name = Path(path).stem
        save_figure(x[0], recon[0], f"{name} ({modality or '?'}): PSNR {psnr:.2f} dB, SSIM {ssim:.4f}; "
                                    f"token ids {list(ids.shape)}", out_dir / f"{name}.png")
        print(f"  {name:40s} token ids {tuple(ids.shape)}  PSNR {psnr:6.2f} dB  SSIM {ssim:.4f}")
        results.append({"image": str(path), "modality": modality, "psnr": psnr, "ssim": ssim,
                        "token_ids_shape": list(ids.shape)})
        pairs.append((x[0].cpu(), recon[0].cpu()))
    from utilities.monitor import save_reconstruction_grid
    save_reconstruction_grid(torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]),
                             out_dir / "summary.png")
    mean_psnr = sum(r["psnr"] for r in results) / len(results)
    mean_ssim = sum(r["ssim"] for r in results) / len(results)
    print(f"mean over {len(results)} images: PSNR {mean_psnr:.2f} dB, SSIM {mean_ssim:.4f}; figures in {out_dir}")
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", help="image files (default: datasets/meta/examples_val.csv)")
    parser.add_argument("--modality", default="", help="modality of the given images, e.g. ct (HU PNG / DICOM windowing)")
    parser.add_argument("--checkpoint", default=None, help="weights (file, folder or hub id); default: see above")
    parser.add_argument("--img-size", type=int, default=None, help="resolution (default: the checkpoint's)")
    parser.add_argument("--out", default="outputs/demo", help="output folder (default outputs/demo)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    images = [(Path(p), args.modality) for p in args.images] if args.images else default_images()
    run(images, find_checkpoint(args.checkpoint), Path(args.out), args.img_size, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
