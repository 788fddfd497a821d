"""Paper Table 3: gFID and diversity of images generated over MedITok tokens, per modality.

Generated images come from a ``samples.npz`` written by ``python -m generation.sample`` (``--samples``), or are
sampled here from a generator checkpoint (``--generator``, temperature 1, no CFG by default, as in the paper) of
any registered kind (:mod:`generation.generators`: ``ar``, the autoregressive generator; ``diffusion``, the joint
image–report diffusion model, whose label-only ``joint`` task gives the images), detected from the checkpoint's
format unless ``--kind`` names it.
Real held-out images of the same modalities (``--real-csv`` / ``--real-folder`` / ``--real-medmnist``) are read
by ``meditok.data`` at the generated images' size (resize short side, centre crop).

Examples::

    python -m evaluation.synthesis --samples runs/synthesis_tiny/samples_cli/samples.npz \\
        --real-csv datasets/meta/examples_val.csv --real-root datasets/examples --random-inception
    python -m evaluation.synthesis --generator runs/synthesis_B/generator.pth --per-label 1000 \\
        --real-medmnist ~/.medmnist/{blood,breast,chest,derma,path,retina}mnist_224.npz --split test
    python -m evaluation.synthesis --generator runs/diffusion --kind diffusion --per-label 100 \\
        --real-csv data/test.csv --real-root data/

Writes ``OUT/synthesis.json``, ``.md`` (Table 3 layout with the paper's rows beside ours, then per modality)
and ``.csv`` (per modality). gFID: pytorch-fid InceptionV3 pool3 features, images quantised to uint8 →
[0, 1], resized to 299 inside pytorch-fid (docs/evaluation.md). Diversity: mean over modalities of the
mean (1 − MS-SSIM) over all distinct pairs of that modality's samples (evaluation/generation_metrics.py).

Exit status: 0 done; 2 bad usage (a flag, a missing or wrong input file, an unknown label or generator kind);
1 a failure while running (e.g. an unreadable real image). Errors are one line on stderr.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from training.checkpoint_files import RunError
from training.options import UsageError, usage_error

from . import fid_inception
from .generation_metrics import diversity_over_modalities, gfid_per_modality
from .metrics import quantize_to_unit
from .paper import PAPER
from .report import environment, markdown_table, relative, write_outputs

PROG = "python -m evaluation.synthesis"


def generator_kinds() -> List[str]:
    """The registered generator kinds (:data:`generation.generators.GENERATORS`): ``ar``, ``diffusion``."""
    from generation.generators import GENERATORS
    return list(GENERATORS)

# Table 3 of the paper: LlamaGen-B trained on each tokenizer's tokens of six MedMNIST subsets.
TABLE3_PAPER = [
    {"tokenizer": "VQGAN", "generator": "LlamaGen-B", "gfid": 130.93, "gfid_pm": None, "diversity": 0.6503},
    {"tokenizer": "UniTok", "generator": "LlamaGen-B", "gfid": 80.71, "gfid_pm": None, "diversity": 0.6584},
    {"tokenizer": "MedITok (stage 1 only)", "generator": "LlamaGen-B", "gfid": 94.98, "gfid_pm": None, "diversity": 0.6479},
    {"tokenizer": "MedITok", "generator": "LlamaGen-B", "gfid": 76.78, "gfid_pm": 1.91, "diversity": 0.6883},
]
MIN_GFID_IMAGES = 100
GENERATOR_OF_SAMPLES = "AR (generation.ar_model)"  # what the report names for --samples (generation.sample's model)
RANDOM_INCEPTION_GFID_WARNING = (
    "gFID WAS COMPUTED WITH A RANDOMLY INITIALISED INCEPTION (--random-inception): a smoke test only; "
    "the gFID values are NOT comparable to the paper or to any other FID")


def one_line(error: BaseException) -> str:
    """An exception's message on one line (some name their fix on a second line)."""
    return " ".join(part.strip() for part in str(error).splitlines() if part.strip()) or type(error).__name__


def load_generated(args: argparse.Namespace) -> Dict[str, Any]:
    """images uint8 [N, H, W, 3], labels [N], label_names, and where they came from.

    Raises :class:`UsageError` for a missing or malformed ``--samples`` file and for a generator checkpoint, label
    or decoding tokenizer that cannot be used."""
    if args.samples:
        path = Path(args.samples)
        if not path.is_file():
            raise UsageError(f"{path}: samples file not found (write one with python -m generation.sample)")
        try:
            data = np.load(path)
            files = data.files
        except (OSError, ValueError, AttributeError) as error:
            raise UsageError(f"{path}: not a readable .npz samples file ({one_line(error)})") from None
        missing = [k for k in ("images", "labels", "label_names") if k not in files]
        if missing:
            raise UsageError(f"{path}: lacks array(s) {missing}; it was not written by generation.sample")
        return {"images": data["images"], "labels": data["labels"], "label_names": [str(n) for n in data["label_names"]],
                "source": relative(path), "sampling": None, "generator": GENERATOR_OF_SAMPLES}
    from generation.generators import generator_for, generator_for_checkpoint
    from generation.sample import load_decoder, sample_labels

    device = torch.device(args.device)
    try:
        kind = generator_for_checkpoint(args.generator) if args.kind == "auto" else generator_for(args.kind)
        model, info = kind.load(args.generator, device=device)
        label_names = info["label_names"]
        labels = sample_labels(model, label_names, args.labels, args.per_label, args.generator)
        tokenizer = load_decoder(info, args.tokenizer, False, device, args.generator)
    except (ValueError, FileNotFoundError) as error:  # CheckpointError, UnknownGeneratorError, config errors
        raise UsageError(one_line(error)) from None
    out = Path(args.out) / "samples"
    settings = {"temperature": 1.0, "cfg_scale": args.cfg_scale}
    stats = sample_and_decode(kind, model, tokenizer, labels, label_names, out, batch_size=args.batch_size,
                              seed=args.seed, progress=not args.quiet,
                              amp_dtype=torch.bfloat16 if device.type == "cuda" else None, **settings)
    data = np.load(out / "samples.npz")
    return {"images": data["images"], "labels": data["labels"], "label_names": label_names,
            "source": relative(Path(args.generator)), "generator": kind.description,
            "sampling": {**stats, "seed": args.seed, **settings, "kind": kind.name,
                         "settings": kind.describe_sampling(**settings)}}


def sample_and_decode(kind, model, tokenizer, labels: torch.Tensor, label_names: List[str], out: Path, *,
                      batch_size: int, seed: int, progress: bool, **settings: Any) -> Dict[str, float]:
    """Sample ids per label through the generator protocol, decode them, write ``OUT/grid_<label>.png`` and
    ``OUT/samples.npz`` (as :func:`generation.sample.run_sampling` does for the AR generator, with the same ids);
    returns timing numbers."""
    from generation.generators import sample_ids
    from generation.sample import decode, save_grid, save_npz_atomically, to_uint8

    ids, seconds = sample_ids(kind, model, labels, batch_size=batch_size, seed=seed, progress=progress, **settings)
    grid = tuple(model.config.grid)
    images = to_uint8(decode(tokenizer, ids.to(tokenizer.device), grid))
    for label in labels.unique().tolist():
        rows = (labels == label).nonzero().flatten().numpy()
        shown = min(len(rows), 64)
        title = f"{label_names[label]}: " + (f"{shown} samples" if shown == len(rows) else
                                            f"first {shown} of {len(rows)} samples")
        save_grid(images[rows[:64]], out / f"grid_{label_names[label]}.png", title=title)
    save_npz_atomically(out / "samples.npz", images=images, ids=ids.numpy().astype(np.uint16),
                        labels=labels.numpy(), label_names=np.array(list(label_names)))
    n, tokens = len(labels), ids.shape[1] * ids.shape[2]
    return {"images": n, "seconds": seconds, "images_per_s": n / max(seconds, 1e-9),
            "tokens_per_s": n * tokens / max(seconds, 1e-9)}


def load_real(args: argparse.Namespace, img_size: int) -> Dict[str, torch.Tensor]:
    """label name → real images [N, 3, S, S] in [0, 1] on the uint8 grid."""
    from generation.token_cache import csv_source, folder_source, medmnist_source

    if args.real_csv:
        source = csv_source(args.real_csv, args.real_root, img_size, label_column=args.label_column)
    elif args.real_folder:
        source = folder_source(args.real_folder, img_size)
    else:
        source = medmnist_source(args.real_medmnist, args.split, img_size)
    count = len(source) if args.max_real is None else min(len(source), args.max_real * len(set(source.labels)))
    groups: Dict[str, List[torch.Tensor]] = {}
    per_label: Dict[str, int] = {}
    from tqdm import tqdm

    for index in tqdm(range(len(source)), desc="real images", unit="img", disable=args.quiet):
        label = source.labels[index]
        if args.max_real is not None and per_label.get(label, 0) >= args.max_real:
            continue
        per_label[label] = per_label.get(label, 0) + 1
        groups.setdefault(label, []).append(quantize_to_unit(source.dataset[index]["image"]))
        if sum(per_label.values()) >= count:
            break
    return {label: torch.stack(images) for label, images in groups.items()}


def evaluate(generated: Dict[str, Any], real: Dict[str, torch.Tensor], inception, batch_size: int) -> Dict[str, Any]:
    names = generated["label_names"]
    images = torch.from_numpy(generated["images"]).permute(0, 3, 1, 2).float() / 255.0
    groups = {names[label]: images[torch.from_numpy(generated["labels"] == label)]
              for label in np.unique(generated["labels"])}
    diversity = diversity_over_modalities({n: g for n, g in groups.items() if len(g) >= 2})
    fid = gfid_per_modality(inception, groups, real, batch_size) if inception is not None else None
    rows = []
    for name, group in groups.items():
        row = {"modality": name, "generated": len(group), "real": len(real.get(name, [])),
               "gfid": None if fid is None else fid["per_modality"].get(name),
               "diversity": diversity["per_modality"].get(name, {}).get("diversity"),
               "pairs": diversity["per_modality"].get(name, {}).get("pairs"),
               "ms_ssim_scales": diversity["per_modality"].get(name, {}).get("ms_ssim_scales")}
        notes = []
        if name not in real:
            notes.append("no real images of this label")
        elif fid is not None and min(row["generated"], row["real"]) < MIN_GFID_IMAGES:
            notes.append(f"fewer than {MIN_GFID_IMAGES} images: gFID not meaningful")
        if row["ms_ssim_scales"] is not None and row["ms_ssim_scales"] < 5:
            notes.append(f"MS-SSIM over {row['ms_ssim_scales']} scales (images < 161 px)")
        row["note"] = "; ".join(notes)
        rows.append(row)
    return {"per_modality": rows, "gfid_mean": None if fid is None else fid["mean"],
            "gfid_std_over_modalities": None if fid is None else fid["std"], "diversity_mean": diversity["mean"]}


def to_markdown(summary: Dict[str, Any], info: Dict[str, Any]) -> str:
    lines = [f"# Synthesis — {info['generated']['source']}", ""]
    for warning in info["warnings"]:
        lines += [f"> **WARNING: {warning}.**", ""]
    lines += [f"Paper rows: {PAPER}, Table 3 (LlamaGen-B on six MedMNIST subsets at 256 px). The paper does not say "
              f"what its ± is; ours is the standard deviation over modalities.", "",
              "## Table 3 layout", ""]
    rows = [[f"paper: {r['tokenizer']}", r["generator"],
             f"{r['gfid']:.2f}" + (f" ± {r['gfid_pm']:.2f}" if r["gfid_pm"] else ""), f"{r['diversity']:.4f}"]
            for r in TABLE3_PAPER]
    gfid = summary["gfid_mean"]
    std = summary["gfid_std_over_modalities"]
    gfid_text = "–" if gfid is None else f"{gfid:.2f}" + (f" ± {std:.2f}" if std is not None else "")
    rows.append([f"**ours**: {info['tokenizer']}", info["generator"], gfid_text, f"{summary['diversity_mean']:.4f}"])
    lines += [markdown_table(["tokenizer", "generator", "gFID ↓", "diversity ↑"], rows), "", "## Per modality", ""]
    lines += [markdown_table(["modality", "generated", "real", "gFID", "diversity", "pairs", "note"],
                             [[r["modality"], r["generated"], r["real"], r["gfid"], r["diversity"], r["pairs"], r["note"]]
                              for r in summary["per_modality"]], digits=4), ""]
    lines += ["## Conventions", "",
              "- **gFID**: " + info["conventions"]["gfid"], "- **diversity**: " + info["conventions"]["diversity"],
              f"- **FID network**: {info['fid_network'].get('network', '–')}, weights {info['fid_network'].get('weights', '–')}", ""]
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m evaluation.synthesis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    gen = parser.add_argument_group("generated images (one of)")
    gen.add_argument("--samples", help="samples.npz from python -m generation.sample")
    gen.add_argument("--generator", help="generator checkpoint to sample from here (temperature 1), of any kind")
    gen.add_argument("--kind", default="auto", choices=["auto", *generator_kinds()],
                     help="with --generator: the generator kind (default auto: detected from the checkpoint's format)")
    gen.add_argument("--per-label", type=int, default=100, help="with --generator: images per label (default 100)")
    gen.add_argument("--labels", nargs="+", default=None, help="with --generator: label names (default all)")
    gen.add_argument("--cfg-scale", type=float, default=None, help="with --generator: CFG scale (default off, as the paper)")
    gen.add_argument("--tokenizer", default=None, help="with --generator: decode with this tokenizer (default: the cache's)")
    gen.add_argument("--batch-size", type=int, default=64, help="sampling and Inception batch size (default 64)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed and random-Inception seed (default 0)")
    real = parser.add_argument_group("real held-out images (one of)")
    real.add_argument("--real-csv", help="metadata CSV (identifier, modality); labels from --label-column")
    real.add_argument("--real-root", default=None, help="folder the CSV's identifiers are relative to")
    real.add_argument("--label-column", default="modality", help="CSV column matching the generator's labels (default modality)")
    real.add_argument("--real-folder", help="folder of <label>/<image> files")
    real.add_argument("--real-medmnist", nargs="+", metavar="NPZ", help="MedMNIST .npz files (label = subset name)")
    real.add_argument("--split", default="test", choices=["train", "val", "test"], help="MedMNIST split (default test)")
    real.add_argument("--max-real", type=int, default=None, help="at most this many real images per label")
    fid = parser.add_argument_group("gFID network")
    fid.add_argument("--inception-weights", type=Path, default=fid_inception.DEFAULT_INCEPTION_WEIGHTS,
                     help=f"pytorch-fid's FID Inception weights (default external/{fid_inception.FID_INCEPTION_FILENAME})")
    fid.add_argument("--random-inception", action="store_true", help="random Inception (smoke tests only: gFID NOT comparable)")
    fid.add_argument("--no-fid", action="store_true", help="diversity only (no Inception needed)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("outputs/synthesis"), help="output folder (default outputs/synthesis)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if bool(args.samples) == bool(args.generator):
        parser.error("give exactly one of --samples NPZ or --generator CKPT")
    if args.samples and args.kind != "auto":
        parser.error("--kind applies to --generator only (a samples file is read whatever made it)")
    if sum(bool(x) for x in (args.real_csv, args.real_folder, args.real_medmnist)) != 1:
        parser.error("give exactly one of --real-csv, --real-folder, --real-medmnist")
    if args.cfg_scale is not None and args.cfg_scale < 0:
        parser.error(f"--cfg-scale must be >= 0, got {args.cfg_scale}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    """0 done; 2 bad usage (:class:`UsageError`, one line on stderr); 1 a run failure (:class:`RunError`)."""
    args = parse_args(argv)
    try:
        return run(args, argv)
    except UsageError as error:
        return usage_error(PROG, one_line(error))
    except RunError as error:
        print(f"{PROG}: error: {one_line(error)}", file=sys.stderr, flush=True)
        return 1


def run(args: argparse.Namespace, argv: Optional[List[str]] = None) -> int:
    device = torch.device(args.device)
    generated = load_generated(args)
    img_size = int(generated["images"].shape[1])
    try:
        real = load_real(args, img_size)
    except Exception as error:
        from generation.token_cache import TokenCacheError
        from meditok.data import MedicalImageError

        given = {str(p) for p in (args.real_csv, args.real_folder, *(args.real_medmnist or ())) if p}
        if isinstance(error, MedicalImageError) and getattr(error, "path", None) not in given:
            raise RunError(one_line(error)) from None  # an image of the real set that cannot be read: the run fails
        if isinstance(error, MedicalImageError):  # the --real-* input itself (missing CSV, lacking a column)
            raise UsageError(one_line(error)) from None
        if isinstance(error, (TokenCacheError, FileNotFoundError)):  # a missing CSV, folder, column or file
            raise UsageError(one_line(error)) from None
        raise
    inception, fid_info = None, {"network": "none (--no-fid)"}
    if not args.no_fid:
        try:
            inception = fid_inception.build_fid_inception(args.inception_weights, random_weights=args.random_inception,
                                                          seed=args.seed, device=device)
        except fid_inception.InceptionWeightsError as error:
            raise UsageError(f"{one_line(error)} (or pass --no-fid for diversity only)") from None
        fid_info = fid_inception.describe(args.inception_weights, args.random_inception)
    summary = evaluate(generated, real, inception, args.batch_size)
    few = [r["modality"] for r in summary["per_modality"] if "not meaningful" in r["note"]]
    info = {
        "task": "synthesis (paper Table 3)",
        "warnings": ([RANDOM_INCEPTION_GFID_WARNING] if args.random_inception and inception is not None else [])
        + ([f"{len(few)} modality(ies) with fewer than {MIN_GFID_IMAGES} generated or real images: gFID not meaningful"]
           if few and inception is not None else []),
        "generated": {"source": generated["source"], "images": int(len(generated["labels"])), "img_size": img_size,
                      "sampling": generated["sampling"]},
        "real": {"source": relative(Path(args.real_csv or args.real_folder or args.real_medmnist[0])),
                 "images": {k: len(v) for k, v in real.items()}},
        "tokenizer": "MedITok tokens (see the generator's token cache)", "generator": generated["generator"],
        "fid_network": fid_info,
        "conventions": {
            "gfid": "Fréchet distance of pytorch-fid InceptionV3 pool3 features, generated vs real images of each "
                    "modality, both uint8-quantised to [0, 1] and resized to 299 inside pytorch-fid; the Table 3 value is "
                    "the mean over modalities",
            "diversity": "per modality, mean of (1 − MS-SSIM) over all distinct pairs of its samples (pytorch-msssim "
                         "MS-SSIM: 5 scales, Gaussian window 11, σ 1.5, data range 1; images of 160 px or less: "
                         "torchmetrics with fewer scales, noted per modality); then the mean over modalities"},
        "paper_table3": TABLE3_PAPER,
        "environment": environment(device),
        "command": ["python", "-m", "evaluation.synthesis"] + (sys.argv[1:] if argv is None else list(argv)),
    }
    payload = {**info, **summary}
    markdown = to_markdown(summary, info)
    paths = write_outputs(args.out, "synthesis", payload, markdown, {"": summary["per_modality"]})
    print(markdown)
    print("wrote " + ", ".join(relative(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
