"""Reconstruct medical images with a MedITok tokenizer and look at the result.

    python demo.py                                   # the validation examples, the best checkpoint found
    python demo.py scan.dcm slice.png --modality ct  # your own files (PNG/JPEG, 16-bit PNG, DICOM, NIfTI)
    python demo.py --checkpoint weights/meditok_simple_v1.pth --img-size 256

Checkpoint by default: the released weights under weights/ if present, else the quick-start output
(runs/stage2_tiny, then runs/stage1_tiny), else a message saying how to get one. For each image it
writes ``<out>/<name>.png`` (input | reconstruction | error map, with PSNR and SSIM) and a
``summary.png`` grid (one labelled row per image), and prints the token-id shape and the metrics. A file
that cannot be read is reported in one line and skipped; the exit status is then 1. PSNR/SSIM: images in [0, 1] after
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


#: The error map's colour scale, labelled the same way in every figure of the project (the training grids of
#: tokenizer_training/monitor.py, evaluation.reconstruction's worst cases): mean |input − reconstruction| over RGB in
#: [0, 1] image units, from 0 (black) to 0.5 (white) and above.
ERROR_LABEL, ERROR_VMAX = "|error| (0-0.5)", 0.5


def save_figure(original: torch.Tensor, recon: torch.Tensor, title: str, path: Path) -> None:
    """input | reconstruction | error map of one image pair [3, H, W] in [-1, 1], saved as a PNG.

    Drawn on a bare ``matplotlib.figure.Figure`` (no pyplot): it saves without a display and leaves the
    notebook's inline backend as it is (``matplotlib.use("Agg")`` here used to switch inline display off)."""
    from matplotlib.figure import Figure
    to_img = lambda t: t.clamp(-1, 1).add(1).div(2).permute(1, 2, 0).cpu().numpy()
    err = (original - recon).abs().mean(0).div(2).cpu().numpy()
    fig = Figure(figsize=(9.6, 3.6))
    axes = fig.subplots(1, 3)
    axes[0].imshow(to_img(original)); axes[0].set_title("input")
    axes[1].imshow(to_img(recon)); axes[1].set_title("reconstruction")
    im = axes[2].imshow(err, cmap="magma", vmin=0, vmax=ERROR_VMAX); axes[2].set_title(ERROR_LABEL)
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def reconstruct_one(model, transform, path: Path, modality: str, device: str):
    """(input [1, 3, S, S], token ids [1, 8, L], reconstruction [1, 3, S, S]) of one file; raises
    MedicalImageError (or OSError) for a file that cannot be read."""
    from meditok.data import read_image
    x = transform(read_image(path, modality=modality or None)).unsqueeze(0).to(device)
    with torch.no_grad():
        ids = model.img_to_idx(x)
        recon = model.idx_to_img(ids)
    return x, ids, recon


def run(images: Sequence[Tuple[Path, str]], checkpoint: Path, out_dir: Path, img_size: Optional[int] = None,
        device: str = "cpu") -> List[dict]:
    """Reconstruct each image, write its figure and the summary grid; one record per image (``error`` set, and
    no metrics, for a file that could not be read: it is reported in one line and the others go on)."""
    from meditok.data import MedicalImageError, eval_transform
    model = meditok.load_meditok(checkpoint, device=device)
    size = img_size or model.config.img_size
    transform = eval_transform(size)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"checkpoint: {checkpoint} (preset {model.config.preset}); images at {size}×{size}; output: {out_dir}")
    results, pairs, labels = [], [], []
    for path, modality in images:
        try:
            x, ids, recon = reconstruct_one(model, transform, path, modality, device)
        except (MedicalImageError, OSError) as error:
            message = str(error) if str(path) in str(error) else f"{path}: {error}"
            print(f"  skipped {message}", file=sys.stderr)
            results.append({"image": str(path), "modality": modality, "error": str(error)})
            continue
        psnr, ssim = quality(x[0], recon[0])
        name = Path(path).stem
        save_figure(x[0], recon[0], f"{name} ({modality or '?'}): PSNR {psnr:.2f} dB, SSIM {ssim:.4f}; "
                                    f"token ids {list(ids.shape)}", out_dir / f"{name}.png")
        print(f"  {name:40s} token ids {tuple(ids.shape)}  PSNR {psnr:6.2f} dB  SSIM {ssim:.4f}")
        results.append({"image": str(path), "modality": modality, "psnr": psnr, "ssim": ssim,
                        "token_ids_shape": list(ids.shape), "error": None})
        pairs.append((x[0].cpu(), recon[0].cpu()))
        labels.append(f"{name} ({modality or '?'}) PSNR {psnr:.1f} dB")
    done = [r for r in results if r["error"] is None]
    if not done:
        print(f"none of the {len(results)} images could be read; no figures written", file=sys.stderr)
        return results
    from tokenizer_training.monitor import save_reconstruction_grid
    save_reconstruction_grid(torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]),
                             out_dir / "summary.png", row_labels=labels)
    mean_psnr = sum(r["psnr"] for r in done) / len(done)
    mean_ssim = sum(r["ssim"] for r in done) / len(done)
    failed = len(results) - len(done)
    print(f"mean over {len(done)} images: PSNR {mean_psnr:.2f} dB, SSIM {mean_ssim:.4f}; figures in {out_dir}"
          + (f"; {failed} file(s) skipped (see above)" if failed else ""))
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
    results = run(images, find_checkpoint(args.checkpoint), Path(args.out), args.img_size, args.device)
    return 1 if any(r["error"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
