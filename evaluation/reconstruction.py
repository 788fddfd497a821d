"""Reconstruction quality per modality — the paper's Table 1 (rFID, PSNR, SSIM) from one command.

Every image is read as training reads it (meditok.data), resized and centre-cropped to --img-size,
encoded, quantised and decoded. The original and the reconstruction are then both quantised to uint8
and compared in [0, 1]:

  PSNR   per image, data range 1, MSE over all pixels and channels; averaged over images.
  SSIM   per image, scikit-image structural_similarity, data range 1, Gaussian window sigma 1.5
         (11x11), population covariance, K1 0.01, K2 0.03, per RGB channel then averaged; in %.
  rFID   Frechet distance between pytorch-fid InceptionV3 pool3 features (2048-d) of the originals
         and of the reconstructions; both resized to 299x299 by pytorch-fid in the same way.
  avg    mean over the paper's Table 1 modalities present (its convention: the mean of its 8 columns);
         other modalities are reported in their own columns and averaged separately, never mixed into
         "avg"; "all images" pools every image.

Modality labels are matched to the paper's Table 1 columns case-insensitively with synonyms
('xray', 'x-ray', 'cxr' -> X-ray; 'pathology' -> Patho; 'dermoscopy' -> Dermo; ...); labels of the
same column are pooled. rFID needs at least 2 images and means little below --min-fid-images.

Examples:
  python -m evaluation.reconstruction --checkpoint weights/meditok_simple_v1.pth \\
      --csv datasets/meta/examples_val.csv --root datasets/examples
  python -m evaluation.reconstruction --checkpoint weights/meditok_simple_v1.pth --folder my_images/
      (folder layout: my_images/<modality>/<image files>)
  python -m evaluation.reconstruction --preset tiny --random-weights --random-inception \\
      --csv datasets/meta/examples_val.csv --root datasets/examples      # smoke test, numbers meaningless

Needs external/pt_inception-2015-12-05-6726825d.pth for rFID (see external/README.md), or
--no-fid to report PSNR/SSIM only. Writes reconstruction.json, .md, .csv (per modality),
reconstruction_per_image.csv and worst/*.png (the worst reconstructions by PSNR) to --out.
"""
from __future__ import annotations

import argparse
import heapq
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, default_collate
from tqdm import tqdm

from meditok.data import CSVImageDataset, MedicalImageError, eval_transform, read_image
from meditok.data.windows import CT_WINDOWS, DEFAULT_CT_WINDOW

from . import fid_inception
from .metrics import GaussianStatistics, NonFiniteImageError, frechet_distance_of, psnr, quantize_to_uint8, ssim
from .paper import PAPER, TABLE1_MEDITOK_AVERAGE, TABLE1_MEDITOK_RFID, TABLE1_MODALITIES, table1_modality
from .progress import progress_options
from .report import environment, markdown_table, relative, write_outputs
from .tokenizer import add_tokenizer_arguments, encode_for_evaluation, labelled_warnings, load_tokenizer

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom")
MIN_FID_IMAGES = 50

CONVENTIONS = {
    "comparison_space": "original and reconstruction both quantised to uint8 (round((x+1)*127.5)) and divided by "
                        "255, i.e. compared in [0, 1]",
    "preprocessing": "meditok.data.read_image, then resize of the short side to img_size and centre crop "
                     "(bilinear, antialiased); CT through the stated window",
    "psnr": "per image 10*log10(1/MSE), data range 1, MSE over all pixels and RGB channels; mean over images",
    "ssim": "per image skimage.metrics.structural_similarity, data_range=1, gaussian_weights=True, sigma=1.5 "
            "(11x11 window), use_sample_covariance=False, K1=0.01, K2=0.03, per RGB channel then averaged; "
            "mean over images; reported in %",
    "rfid": "Frechet distance (float64, symmetric eigendecomposition) between Gaussians fitted (unbiased "
            "covariance) to pytorch-fid InceptionV3 pool3 features of the originals and of the reconstructions; "
            "pytorch-fid resizes both to 299x299 (bilinear, align_corners=False)",
    "average": "'avg' = mean over the paper's Table 1 modalities present (its 'avg' is the mean of its 8 "
               "columns); modalities outside Table 1 are listed separately with their own mean "
               "('average_over_other_modalities'); 'all images' pools every image",
    "small_sets": f"rFID is computed from 2 images up but is statistically meaningless below {MIN_FID_IMAGES} "
                  "images per modality (FID is biased upwards for small sets)",
}


# --------------------------------------------------------------------------------------------------
# Data


class FolderImageDataset(Dataset):
    """Image files under a folder; the modality of each is its first sub-folder's name (or a fixed one).

    Samples are dicts like :class:`meditok.data.CSVImageDataset`'s: ``image`` float32 [3, H, W] in
    [-1, 1] (after ``transform``), ``modality`` (lower-case str), ``identifier`` (path relative to the
    folder).
    """

    def __init__(self, folder: Path, transform=None, modality: Optional[str] = None, ct_window=DEFAULT_CT_WINDOW):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise MedicalImageError(self.folder, "image folder not found", "check the --folder path")
        self.files = sorted(p for p in self.folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise MedicalImageError(self.folder, f"no image files ({', '.join(IMAGE_SUFFIXES)}) below this folder",
                                    "point --folder at a folder holding <modality>/<image> files")
        self.transform = transform
        self.fixed_modality = modality
        self.ct_window = ct_window
        self.modalities = [self._modality_of(p) for p in self.files]

    def _modality_of(self, path: Path) -> str:
        if self.fixed_modality:
            return self.fixed_modality.strip().lower()
        parts = path.relative_to(self.folder).parts
        return parts[0].strip().lower() if len(parts) > 1 else ""

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        path, modality = self.files[index], self.modalities[index]
        image = read_image(path, modality or None, self.ct_window if modality == "ct" else None)
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "modality": modality, "identifier": str(path.relative_to(self.folder))}


class SkipUnreadable(Dataset):
    """Wraps a dataset so that an unreadable image yields ``{"unreadable": message}`` instead of raising.

    meditok.data's own 'skip' policy substitutes the next readable row, which suits training but would
    count that image twice here; evaluation drops the image and reports it.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        try:
            return self.dataset[index]
        except MedicalImageError as error:
            return {"unreadable": str(error)}


def collate_readable(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Default collation of the readable samples; ``unreadable`` lists the messages of the others."""
    readable = [s for s in samples if "unreadable" not in s]
    batch = default_collate(readable) if readable else {}
    batch["unreadable"] = [s["unreadable"] for s in samples if "unreadable" in s]
    return batch


def build_dataset(args: argparse.Namespace, img_size: int) -> Dataset:
    transform = eval_transform(img_size)
    if args.csv:
        dataset = CSVImageDataset(args.csv, root=args.root, transform=transform, ct_window=args.ct_window,
                                  modality_column=args.modality_column, allow_outside_root=args.allow_outside_root)
    else:
        dataset = FolderImageDataset(Path(args.folder), transform, modality=args.modality, ct_window=args.ct_window)
    if args.max_images is not None and args.max_images < len(dataset):
        dataset = Subset(dataset, range(args.max_images))
    return SkipUnreadable(dataset) if args.on_error == "skip" else dataset


def modality_group(label: str) -> str:
    """The column an image is reported under: its Table 1 name when it has one, else its own label."""
    return table1_modality(label) or (label.strip().lower() if label and label.strip() else "unlabelled")


# --------------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class GroupResult:
    """Running results of one modality group."""

    name: str
    labels: set = field(default_factory=set)
    psnr: List[float] = field(default_factory=list)
    ssim: List[float] = field(default_factory=list)
    original_features: Optional[GaussianStatistics] = None
    reconstruction_features: Optional[GaussianStatistics] = None

    def add_features(self, original: torch.Tensor, reconstruction: torch.Tensor) -> None:
        if self.original_features is None:
            self.original_features = GaussianStatistics(original.shape[1])
            self.reconstruction_features = GaussianStatistics(original.shape[1])
        self.original_features.update(original)
        self.reconstruction_features.update(reconstruction)

    def summary(self, min_fid_images: int) -> Dict[str, Any]:
        count = len(self.psnr)
        rfid, note = None, ""
        if self.original_features is not None:
            if count >= 2:
                rfid = frechet_distance_of(self.original_features, self.reconstruction_features)
                if count < min_fid_images:
                    note = f"rFID from only {count} images (< {min_fid_images}): statistically meaningless"
            else:
                note = "rFID needs at least 2 images"
        return {
            "modality": self.name, "table1_column": self.name if self.name in TABLE1_MODALITIES else None,
            "labels": sorted(self.labels), "images": count,
            "rfid": rfid, "psnr": float(np.mean(self.psnr)) if count else None,
            "ssim": 100.0 * float(np.mean(self.ssim)) if count else None,
            "psnr_std": float(np.std(self.psnr)) if count else None,
            "ssim_std": 100.0 * float(np.std(self.ssim)) if count else None,
            "paper_rfid": TABLE1_MEDITOK_RFID.get(self.name), "note": note,
        }


def evaluate(model, dataset: Dataset, *, batch_size: int, num_workers: int, inception=None, worst_k: int = 8,
             progress: bool = True) -> Dict[str, Any]:
    """Reconstruct every image and collect per-image metrics, per-group feature statistics and the worst cases.

    Returns a dict: ``groups`` (OrderedDict name → GroupResult), ``all`` (GroupResult over every image),
    ``per_image`` (list of dicts), ``worst`` (list of (psnr, ssim, identifier, modality, original uint8
    [3, H, W], reconstruction uint8 [3, H, W]), worst first), ``unreadable`` (messages of skipped images).
    """
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda", collate_fn=collate_readable)
    groups: "OrderedDict[str, GroupResult]" = OrderedDict()
    everything = GroupResult("all images")
    per_image: List[Dict[str, Any]] = []
    worst_heap: list = []  # max-heap on PSNR via negation: keeps the worst_k lowest PSNRs
    unreadable: List[str] = []
    for batch in tqdm(loader, desc="reconstruct", unit="batch", disable=not progress, **progress_options()):
        unreadable += batch["unreadable"]
        if "image" not in batch:
            continue
        images = batch["image"].to(device, non_blocking=True)
        refuse_non_finite(images, batch["identifier"], "image")
        reconstruction = encode_for_evaluation(model, images)["reconstruction"]
        refuse_non_finite(reconstruction, batch["identifier"], "reconstruction (the tokenizer's output) of")
        original_u8, reconstruction_u8 = quantize_to_uint8(images).cpu(), quantize_to_uint8(reconstruction).cpu()
        original01, reconstruction01 = original_u8.float() / 255, reconstruction_u8.float() / 255
        batch_psnr = psnr(original01, reconstruction01).tolist()
        batch_ssim = ssim(original01, reconstruction01).tolist()
        if inception is not None:
            original_features = fid_inception.inception_features(inception, original01)
            reconstruction_features = fid_inception.inception_features(inception, reconstruction01)
        labels = [str(m) for m in batch["modality"]]
        for i, (label, identifier) in enumerate(zip(labels, batch["identifier"])):
            name = modality_group(label)
            group = groups.setdefault(name, GroupResult(name))
            group.labels.add(label)
            everything.labels.add(label)
            for target in (group, everything):
                target.psnr.append(batch_psnr[i])
                target.ssim.append(batch_ssim[i])
            per_image.append({"identifier": identifier, "modality": label, "group": name,
                              "psnr": batch_psnr[i], "ssim": 100.0 * batch_ssim[i]})
            if worst_k > 0:
                entry = (-batch_psnr[i], len(per_image), batch_ssim[i], identifier, label, original_u8[i], reconstruction_u8[i])
                if len(worst_heap) < worst_k:
                    heapq.heappush(worst_heap, entry)
                elif entry[0] > worst_heap[0][0]:
                    heapq.heapreplace(worst_heap, entry)
        if inception is not None:
            names = [modality_group(label) for label in labels]
            for name in dict.fromkeys(names):
                rows = [i for i, n in enumerate(names) if n == name]
                groups[name].add_features(original_features[rows], reconstruction_features[rows])
            everything.add_features(original_features, reconstruction_features)
    worst = [(-e[0], e[2], e[3], e[4], e[5], e[6]) for e in sorted(worst_heap, key=lambda e: (-e[0], e[1]))]
    return {"groups": groups, "all": everything, "per_image": per_image, "worst": worst, "unreadable": unreadable}


def refuse_non_finite(images: torch.Tensor, identifiers: Sequence[str], what: str) -> None:
    """NonFiniteImageError naming the images of a batch [B, ...] that hold NaN/Inf: they have no PSNR.

    meditok.data's readers already refuse such files; this catches a transform or a tokenizer that makes them.
    """
    finite = torch.isfinite(images.flatten(1)).all(dim=1).cpu()
    if not bool(finite.all()):
        bad = [str(identifiers[i]) for i in torch.nonzero(~finite).flatten().tolist()]
        raise NonFiniteImageError(f"the {what} {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} holds NaN/Inf "
                                  "values: no PSNR/SSIM/rFID is computed from them")


def order_groups(names: Sequence[str]) -> List[str]:
    """Paper columns first, in the paper's order; other labels after, alphabetically."""
    in_paper = [m for m in TABLE1_MODALITIES if m in names]
    return in_paper + sorted(n for n in names if n not in TABLE1_MODALITIES)


def summarise(result: Dict[str, Any], min_fid_images: int, with_fid: bool) -> Dict[str, Any]:
    names = order_groups(list(result["groups"]))
    per_modality = [result["groups"][n].summary(min_fid_images) for n in names]
    overall = result["all"].summary(min_fid_images)
    overall["note"] = overall["note"].replace("rFID", "pooled rFID")

    in_table1 = [row for row in per_modality if row["table1_column"]]
    others = [row for row in per_modality if not row["table1_column"]]
    matched = [row["modality"] for row in in_table1]
    return {"per_modality": per_modality, "average_over_modalities": modality_average(in_table1, with_fid),
            "other_modalities": [row["modality"] for row in others],
            "average_over_other_modalities": modality_average(others, with_fid) if others else None,
            "all_images": overall, "table1_columns_matched": matched,
            "table1_columns_missing": [m for m in TABLE1_MODALITIES if m not in matched]}


def modality_average(rows: List[Dict[str, Any]], with_fid: bool) -> Dict[str, Any]:
    """Mean rFID / PSNR / SSIM over per-modality rows (each modality counts once, as in the paper's 'avg')."""
    def mean_of(key):
        values = [row[key] for row in rows if row[key] is not None]
        return float(np.mean(values)) if values else None

    return {"modalities": len(rows), "names": [row["modality"] for row in rows],
            "rfid": mean_of("rfid") if with_fid else None, "rfid_modalities": sum(row["rfid"] is not None for row in rows),
            "psnr": mean_of("psnr"), "ssim": mean_of("ssim")}


# --------------------------------------------------------------------------------------------------
# Outputs

#: The error map's scale and title, the same in every figure (demo.py, the training grids of tokenizer_training/monitor.py).
ERROR_LABEL, ERROR_VMAX = "|error| (0-0.5)", 0.5


def save_worst_figures(worst: list, out_dir: Path) -> List[Dict[str, Any]]:
    """One PNG per worst case: original | reconstruction | error map, on the scale every figure of the project
    uses (mean |difference| over RGB in [0, 1] units, colour bar 0 → 0.5, titled ``ERROR_LABEL``). Drawn on bare
    ``Figure`` objects: no pyplot backend is chosen or changed (a notebook keeps its inline display)."""
    from matplotlib.figure import Figure

    folder = out_dir / "worst"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("rank*.png"):
        stale.unlink()
    records = []
    for rank, (value_psnr, value_ssim, identifier, label, original, reconstruction) in enumerate(worst, start=1):
        difference = (original.float() - reconstruction.float()).abs().mean(dim=0).div(255).numpy()
        fig = Figure(figsize=(11, 3.9), constrained_layout=True)
        axes = fig.subplots(1, 3)
        axes[0].imshow(original.permute(1, 2, 0).numpy())
        axes[0].set_title("original\n(uint8, as compared)")
        axes[1].imshow(reconstruction.permute(1, 2, 0).numpy())
        axes[1].set_title(f"reconstruction\nPSNR {value_psnr:.2f} dB, SSIM {100 * value_ssim:.1f}%")
        shown = axes[2].imshow(difference, cmap="magma", vmin=0, vmax=ERROR_VMAX)
        axes[2].set_title(ERROR_LABEL)
        fig.colorbar(shown, ax=axes[2], fraction=0.046)
        for axis in axes:
            axis.set_axis_off()
        fig.suptitle(f"#{rank} worst: {identifier} ({label or 'no modality'})", fontsize=10)
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(Path(identifier).with_suffix("")))[-80:]
        path = folder / f"rank{rank:02d}_{safe}.png"
        fig.savefig(path, dpi=100)
        records.append({"rank": rank, "identifier": identifier, "modality": label, "psnr": value_psnr,
                        "ssim": 100 * value_ssim, "figure": str(path.relative_to(out_dir))})
    return records


def to_markdown(summary: Dict[str, Any], info: Dict[str, Any], worst: List[Dict[str, Any]]) -> str:
    per_modality = summary["per_modality"]
    in_table1 = [row for row in per_modality if row["table1_column"]]
    names = [row["modality"] for row in in_table1]
    average, overall = summary["average_over_modalities"], summary["all_images"]
    others, other_average = summary["other_modalities"], summary["average_over_other_modalities"]
    lines = [f"# Reconstruction — {info['tokenizer']['source']} on {info['data']['source']}", ""]
    for warning in info["warnings"]:
        lines += [f"> **WARNING: {warning}.**", ""]
    lines += [f"{overall['images']} images at {info['data']['img_size']} px, {len(per_modality)} modalities. "
              f"Paper row: {PAPER}, Table 1, MedITok (f=16).", "",
              "## Table 1 layout (rFID ↓ per modality; PSNR ↑, SSIM ↑ averaged over modalities)", ""]
    header = [""] + [f"{n} rFID" for n in names] + ["avg rFID", "avg PSNR", "avg SSIM (%)"]
    ours = ["ours"] + [row["rfid"] for row in in_table1] + [average["rfid"], average["psnr"], average["ssim"]]
    paper = ["paper MedITok"] + [TABLE1_MEDITOK_RFID.get(n) for n in names] + [
        TABLE1_MEDITOK_AVERAGE["rfid"], TABLE1_MEDITOK_AVERAGE["psnr"], TABLE1_MEDITOK_AVERAGE["ssim"]]
    lines += [markdown_table(header, [ours, paper]), ""]
    lines += [f"'avg' is the mean over the {len(names)} Table 1 modalities present"
              + (f" ({', '.join(names)})" if names else "") + ", as the paper's is over its 8."
              + (f" Not in Table 1 and left out of 'avg': {', '.join(others)} (see 'Per modality', where their own "
                 f"mean is listed separately)." if others else ""), ""]
    if average["rfid"] is not None and average["rfid_modalities"] < len(names):
        lines += [f"avg rFID is over the {average['rfid_modalities']} modalities with an rFID (at least 2 images).", ""]
    missing = summary["table1_columns_missing"]
    if missing:
        lines += [f"The paper's averages are over its 8 modalities; this run lacks {', '.join(missing)}, so the "
                  f"'avg' columns are not directly comparable.", ""]
    lines += ["## Per modality", ""]
    rows = [[row["modality"], ", ".join(row["labels"]), row["images"], row["rfid"], row["paper_rfid"], row["psnr"],
             row["ssim"], row["note"]] for row in per_modality]
    rows.append(["**avg over Table 1 modalities**", ", ".join(average["names"]), None, average["rfid"],
                 TABLE1_MEDITOK_AVERAGE["rfid"], average["psnr"], average["ssim"], ""])
    if other_average:
        rows.append(["mean over the other modalities (not in 'avg')", ", ".join(other_average["names"]), None,
                     other_average["rfid"], None, other_average["psnr"], other_average["ssim"], ""])
    rows.append(["**all images (pooled)**", "", overall["images"], overall["rfid"], None, overall["psnr"],
                 overall["ssim"], overall["note"]])
    lines += [markdown_table(["modality", "labels in data", "images", "rFID", "paper rFID", "PSNR (dB)", "SSIM (%)",
                              "note"], rows), ""]
    if worst:
        lines += ["## Worst reconstructions (lowest PSNR)", ""]
        lines += [markdown_table(["rank", "identifier", "modality", "PSNR", "SSIM (%)", "figure"],
                                 [[w["rank"], w["identifier"], w["modality"], w["psnr"], w["ssim"],
                                   f"[{w['figure']}]({w['figure']})"] for w in worst]), ""]
    lines += ["## Conventions", ""] + [f"- **{key}**: {text}" for key, text in info["conventions"].items()]
    lines += [f"- **FID network**: {info['fid_network'].get('network', '–')}, weights "
              f"{info['fid_network'].get('weights', '–')}", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Command line


def add_inception_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("rFID network")
    group.add_argument("--inception-weights", type=Path, default=fid_inception.DEFAULT_INCEPTION_WEIGHTS, metavar="PATH",
                       help=f"pytorch-fid's FID Inception weights (default: external/{fid_inception.FID_INCEPTION_FILENAME}; "
                            f"download from {fid_inception.FID_INCEPTION_URL})")
    group.add_argument("--random-inception", action="store_true",
                       help="random Inception weights instead of the file (smoke tests only: rFID NOT comparable)")
    group.add_argument("--no-fid", action="store_true", help="skip rFID (PSNR and SSIM only; no Inception needed)")
    group.add_argument("--min-fid-images", type=int, default=MIN_FID_IMAGES, metavar="N",
                       help=f"flag rFID of a modality with fewer images as meaningless (default {MIN_FID_IMAGES})")


def build_inception(args: argparse.Namespace, device: torch.device):
    """(network or None, description); exits with the download instructions when the weights are missing."""
    if args.no_fid:
        return None, {"network": "none (--no-fid)"}
    try:
        network = fid_inception.build_fid_inception(args.inception_weights, random_weights=args.random_inception,
                                                    seed=args.seed, device=device)
    except fid_inception.InceptionWeightsError as error:
        raise SystemExit(f"error: {error}\n(or pass --no-fid to skip rFID)") from None
    return network, fid_inception.describe(args.inception_weights, args.random_inception)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m evaluation.reconstruction", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data (one of --csv or --folder)")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", type=Path, metavar="PATH", help="metadata CSV with columns identifier, modality (caption optional)")
    source.add_argument("--folder", type=Path, metavar="DIR", help="folder of <modality>/<image> files")
    data.add_argument("--root", type=Path, default=None, metavar="DIR",
                      help="folder the CSV's relative identifiers are resolved against (default: as written)")
    data.add_argument("--allow-outside-root", action="store_true",
                      help="accept CSV rows (absolute or ../) that resolve outside --root (refused by default)")
    data.add_argument("--modality-column", default="modality", metavar="NAME", help="CSV column holding the modality (default modality)")
    data.add_argument("--modality", default=None, metavar="LABEL", help="with --folder: one modality for every file (flat folders)")
    data.add_argument("--ct-window", default=DEFAULT_CT_WINDOW, choices=sorted(CT_WINDOWS),
                      help=f"CT window mapping HU to [-1, 1] (default {DEFAULT_CT_WINDOW})")
    data.add_argument("--img-size", type=int, default=None, metavar="PX",
                      help="resize + centre crop side, a multiple of 16 (default: the model's, 256 for large)")
    data.add_argument("--max-images", type=int, default=None, metavar="N", help="only the first N images (quick looks)")
    data.add_argument("--on-error", default="raise", choices=("raise", "skip"),
                      help="unreadable image: stop (default), or leave it out and list it in the outputs")
    add_tokenizer_arguments(parser)
    add_inception_arguments(parser)
    run = parser.add_argument_group("run")
    run.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per batch (default 32)")
    run.add_argument("--num-workers", type=int, default=2, metavar="N", help="DataLoader workers (default 2)")
    run.add_argument("--worst", type=int, default=8, metavar="N", help="save figures of the N worst reconstructions (default 8)")
    run.add_argument("--out", type=Path, default=Path("outputs/reconstruction"), metavar="DIR", help="output folder (default outputs/reconstruction)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.img_size is not None and (args.img_size <= 0 or args.img_size % 16):
        parser.error(f"--img-size {args.img_size} must be a positive multiple of 16 (the tokenizer's downsampling)")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    model, tokenizer_info = load_tokenizer(args)
    device = next(model.parameters()).device
    img_size = args.img_size or model.config.img_size
    try:
        dataset = build_dataset(args, img_size)
    except MedicalImageError as error:
        raise SystemExit(f"error: {error}") from None
    inception, fid_info = build_inception(args, device)
    try:
        result = evaluate(model, dataset, batch_size=args.batch_size, num_workers=args.num_workers, inception=inception,
                          worst_k=args.worst, progress=not args.quiet)
    except MedicalImageError as error:
        raise SystemExit(f"error: {error}\n(pass --on-error skip to skip unreadable images)") from None
    except NonFiniteImageError as error:
        raise SystemExit(f"error: {error}") from None
    summary = summarise(result, args.min_fid_images, inception is not None)
    worst = save_worst_figures(result["worst"], args.out) if result["worst"] else []
    notes = [row["note"] for row in summary["per_modality"] if row["note"]]
    info = {
        "task": "reconstruction (paper Table 1)",
        "warnings": labelled_warnings(tokenizer_info, fid_info if args.random_inception and inception else None)
        + ([f"{len(notes)} modality(ies) with too few images for a meaningful rFID"] if notes and inception else [])
        + ([f"{len(result['unreadable'])} unreadable image(s) left out (listed under 'unreadable')"]
           if result["unreadable"] else []),
        "tokenizer": tokenizer_info,
        "fid_network": fid_info,
        "data": {"source": relative(args.csv) if args.csv else relative(args.folder),
                 "root": relative(args.root) if args.root else None, "img_size": img_size, "ct_window": args.ct_window,
                 "images": len(dataset)},
        "conventions": CONVENTIONS,
        "paper_table1_meditok": {"rfid": TABLE1_MEDITOK_RFID, "average": TABLE1_MEDITOK_AVERAGE, "source": PAPER},
        "environment": environment(device),
        "command": ["python", "-m", "evaluation.reconstruction"] + (sys.argv[1:] if argv is None else list(argv)),
    }
    payload = {**info, **summary, "worst_cases": worst, "unreadable": result["unreadable"]}
    markdown = to_markdown(summary, info, worst)
    paths = write_outputs(args.out, "reconstruction", payload, markdown,
                          {"": summary["per_modality"] + [summary["all_images"]], "per_image": result["per_image"]})
    print(markdown)
    print("wrote " + ", ".join(relative(p) for p in paths) + (f" and {len(worst)} figures in {relative(args.out / 'worst')}" if worst else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
