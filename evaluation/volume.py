"""3D evaluation — the paper's Table S2 (slice-wise encoding, volume-level metrics and probing) from one command.

Each volume (NIfTI .nii/.nii.gz, a folder holding one DICOM series, or a multi-frame DICOM) is read with
meditok.data.read_volume in RAS+ orientation and mapped to [-1, 1]: CT through a CT window (HU),
anything else with the paper's MRI normalisation (0.5th-99.5th percentile clip, min-max). Every
--step-th slice along --axis is shown as a display-oriented slice (meditok.data.volume_slice), resized
and centre-cropped to --img-size, encoded, quantised and decoded. Volume-level numbers:

  PSNR   one value per volume: 10*log10(1/MSE) with the MSE over every voxel of the evaluated slices
         (grey values: the reconstruction's RGB mean), both sides uint8-quantised, in [0, 1]
  SSIM   per volume: mean over its slices of the 2D SSIM (the same scikit-image settings as
         evaluation.reconstruction: data range 1, Gaussian sigma 1.5), in %
  rFID   over all evaluated slices of all volumes (grey slices repeated to RGB), pytorch-fid Inception
  table  mean over volumes of PSNR and SSIM; rFID pooled over slices
  probe  volume feature = mean over its slices of the slice features (grid: quantised token grid
         flattened; pooled: post-quantisation tokens averaged); one linear layer as in
         evaluation.linear_probe, trained on the 'train' volumes and tested on the 'test' ones

Input: --volumes PATH ... with --modality, or --csv with columns identifier (volume path), modality,
and for probing label and split (train / val / test).

Examples:
  python -m evaluation.volume --checkpoint weights/meditok_simple_v1.pth --volumes scan.nii.gz --modality ct
  python -m evaluation.volume --checkpoint weights/meditok_simple_v1.pth --csv volumes.csv --root data/
  python -m evaluation.volume --preset tiny --random-weights --random-inception --img-size 64 \\
      --volumes .venv/lib/python3.11/site-packages/nibabel/tests/data/anatomical.nii --modality mri  # smoke test

Writes volume.json, .md, .csv (one row per volume), volume_probe.csv and volume_probe_history.csv (when
probing) to --out.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from meditok.data import MedicalImageError, eval_transform, normalise_mri_volume, read_volume, volume_slice
from meditok.data.reading import AXIS_NAMES
from meditok.data.windows import CT_WINDOWS, DEFAULT_CT_WINDOW, ct_window, window_bounds

from . import fid_inception
from .linear_probe import MULTI_CLASS, FeatureTable, infer_task, train_linear_probe
from .metrics import GaussianStatistics, NonFiniteImageError, frechet_distance_of, quantize_to_uint8, require_finite, ssim
from .paper import PAPER, TABLE_S2_MEDITOK
from .progress import progress_options
from .reconstruction import add_inception_arguments, build_inception
from .report import environment, markdown_table, relative, write_outputs
from .tokenizer import add_tokenizer_arguments, encode_for_evaluation, labelled_warnings, load_tokenizer

CONVENTIONS = {
    "intensity": "CT: HU through the chosen CT window to [-1, 1]; other modalities: clip to the volume's 0.5th-99.5th "
                 "percentiles, min-max to [-1, 1] (meditok.data.normalise_mri_volume)",
    "slices": "every --step-th slice along --axis of the RAS+ volume, display-oriented (radiological convention), "
              "resized (short side) and centre-cropped to img_size; grey repeated to RGB for the tokenizer",
    "comparison_space": "grey values: original slice and the RGB mean of its reconstruction, both quantised to uint8 "
                        "and divided by 255",
    "psnr": "per volume 10*log10(1/MSE), MSE over all voxels of the evaluated slices; table: mean over volumes",
    "ssim": "per volume mean of 2D skimage SSIM over its slices (data_range=1, gaussian_weights=True, sigma=1.5, "
            "use_sample_covariance=False); table: mean over volumes; in %",
    "rfid": "Frechet distance of pytorch-fid InceptionV3 pool3 features between all original and all reconstructed "
            "slices (grey repeated to RGB; pytorch-fid resizes to 299x299)",
    "probe_features": "volume feature = mean over the volume's evaluated slices of the slice features",
}


# --------------------------------------------------------------------------------------------------
# Volumes


def list_volumes(args: argparse.Namespace) -> pd.DataFrame:
    """A table with columns identifier, path, modality, label ('' if none), split ('' if none)."""
    if args.csv:
        if not args.csv.is_file():
            raise MedicalImageError(args.csv, "volume CSV not found", "check the --csv path")
        table = pd.read_csv(args.csv, dtype=str, keep_default_na=False)
        missing = [c for c in ("identifier", "modality") if c not in table.columns]
        if missing:
            raise MedicalImageError(args.csv, f"missing column(s) {missing}; columns present: {list(table.columns)}",
                                    "a volume CSV needs identifier (volume path) and modality; label and split "
                                    "(train/val/test) for probing")
        if len(table) == 0:
            raise MedicalImageError(args.csv, "volume CSV has no rows (only a header, or empty)",
                                    "list one volume per row: identifier (volume path), modality[, label, split]")
        root = args.root
        paths = [Path(i) if Path(i).is_absolute() or root is None else root / i for i in table["identifier"]]
        rows = pd.DataFrame({"identifier": table["identifier"], "path": [str(p) for p in paths],
                             "modality": table["modality"].str.strip().str.lower(),
                             "label": table.get(args.label_column, pd.Series([""] * len(table))),
                             "split": table.get("split", pd.Series([""] * len(table))).str.strip().str.lower()})
        return rows
    if not args.modality:
        raise SystemExit("error: --volumes needs --modality (ct, or mri / any other for percentile normalisation)")
    missing = [str(p) for p in args.volumes if not p.exists()]
    if missing:
        raise SystemExit(f"error: volume(s) not found: {', '.join(missing)}; check the --volumes paths (NIfTI files, "
                         "DICOM series folders or multi-frame DICOMs)")
    return pd.DataFrame({"identifier": [str(p) for p in args.volumes], "path": [str(p) for p in args.volumes],
                         "modality": args.modality.strip().lower(), "label": "", "split": ""})


def volume_to_signed(volume: np.ndarray, modality: str, window: str) -> np.ndarray:
    """[X, Y, Z] HU (ct) or stored values → float32 [X, Y, Z] in [-1, 1] (see CONVENTIONS['intensity'])."""
    if modality == "ct":
        return ct_window(volume, *window_bounds(window)).numpy()
    return normalise_mri_volume(volume)


def volume_slices(signed: np.ndarray, axis: int, step: int, img_size: int) -> torch.Tensor:
    """Every step-th slice along axis → [n, 3, img_size, img_size] in [-1, 1]."""
    transform = eval_transform(img_size)
    slices = [torch.from_numpy(volume_slice(signed, axis, index)) for index in range(0, signed.shape[axis], step)]
    return torch.stack([transform(s[None].expand(3, -1, -1)) for s in slices])


# --------------------------------------------------------------------------------------------------
# Evaluation


def evaluate_volume(model, slices: torch.Tensor, batch_size: int, inception=None) -> Dict[str, Any]:
    """Reconstruct a volume's slices and measure it.

    Args:
        slices: [n, 3, S, S] in [-1, 1] (grey repeated to RGB).

    Raises:
        NonFiniteImageError: the slices or their reconstructions hold NaN/Inf (no PSNR exists for them).

    Returns a dict: psnr (dB, over all voxels), ssim (fraction, mean over slices), mse, slices (n),
    grid_mean [L·64] and pooled_mean [vit_width] (mean over slices), original/reconstruction Inception
    features [n, 2048] (if inception), worst_slice (index of the lowest-PSNR slice).
    """
    device = next(model.parameters()).device
    require_finite(slices, "volume slices")
    originals, reconstructions, grids, pooled = [], [], [], []
    original_features, reconstruction_features = [], []
    for start in range(0, len(slices), batch_size):
        batch = slices[start:start + batch_size].to(device)
        out = encode_for_evaluation(model, batch)
        require_finite(out["reconstruction"], f"reconstruction of slices {start}..{start + len(batch) - 1}")
        original = quantize_to_uint8(batch[:, 0]).cpu()
        reconstruction = quantize_to_uint8(out["reconstruction"].mean(dim=1)).cpu()
        originals.append(original)
        reconstructions.append(reconstruction)
        grids.append(out["grid"].sum(dim=0).double().cpu())
        pooled.append(out["pooled"].sum(dim=0).double().cpu())
        if inception is not None:
            original_features.append(fid_inception.inception_features(inception, (original.float() / 255)[:, None].expand(-1, 3, -1, -1)))
            reconstruction_features.append(fid_inception.inception_features(inception, (reconstruction.float() / 255)[:, None].expand(-1, 3, -1, -1)))
    original01 = torch.cat(originals).double() / 255
    reconstruction01 = torch.cat(reconstructions).double() / 255
    squared_error = (original01 - reconstruction01).pow(2)
    mse = float(squared_error.mean())
    per_slice_mse = squared_error.flatten(1).mean(dim=1)
    n = len(slices)
    return {
        "slices": n, "mse": mse, "psnr": 10 * np.log10(1.0 / mse) if mse > 0 else float("inf"),
        "ssim": float(ssim(original01, reconstruction01).mean()),
        "grid_mean": (torch.stack(grids).sum(dim=0) / n).float(), "pooled_mean": (torch.stack(pooled).sum(dim=0) / n).float(),
        "original_features": torch.cat(original_features) if original_features else None,
        "reconstruction_features": torch.cat(reconstruction_features) if reconstruction_features else None,
        "worst_slice": int(per_slice_mse.argmax()),
    }


def probe_volumes(table: pd.DataFrame, features: Dict[str, List[torch.Tensor]], args) -> Dict[str, Any]:
    """Linear probe on volume features when the table has labels and train/test splits; else the reason it was skipped."""
    labelled = table[(table["label"] != "") & table["split"].isin(["train", "val", "test"])]
    splits = set(labelled["split"])
    if not {"train", "test"} <= splits:
        return {"skipped": "no probe: probing needs --csv with a label column and split values 'train' and 'test' "
                           f"(found splits: {', '.join(sorted(splits)) or 'none'})"}
    values = sorted(set(labelled["label"]))
    if all(v.lstrip("-").isdigit() for v in values):
        class_of = {v: int(v) for v in values}
    else:
        class_of = {v: i for i, v in enumerate(values)}
    _, num_classes = infer_task([np.array([class_of[v] for v in labelled["label"]])], str(args.csv))
    rows, history = [], []
    for variant in args.features:
        def split_data(split):
            index = [i for i in labelled.index if table.at[i, "split"] == split]
            return (FeatureTable.from_dense(torch.stack([features[variant][i] for i in index]).numpy()),
                    np.array([class_of[table.at[i, "label"]] for i in index]))
        train_x, train_y = split_data("train")
        test_x, test_y = split_data("test")
        val_x, val_y = split_data("val") if "val" in splits else (None, None)
        result = train_linear_probe(train_x, train_y, test_x, test_y, task=MULTI_CLASS, num_classes=num_classes,
                                    epochs=args.probe_epochs, lr=args.lr, batch_size=args.probe_batch_size, seed=args.seed,
                                    device=args.device, val=val_x, val_labels=val_y, progress=not args.quiet,
                                    desc=f"probe volumes/{variant}")
        rows.append({"features": variant, "feature_dim": result.feature_dim, "n_train": len(train_y), "n_test": len(test_y),
                     "num_classes": num_classes, "best_map": result.best_map["map"], "best_map_epoch": result.best_map["epoch"],
                     "best_map_two_class": result.best_map_two_class["map_two_class"],
                     "best_auc": result.best_auc["auc"], "best_auc_epoch": result.best_auc["epoch"],
                     "val_selected_auc": result.val_selected["auc"] if result.val_selected else None,
                     "val_selected_map": result.val_selected["map"] if result.val_selected else None})
        history += [{"features": variant, **h} for h in result.history]
    return {"rows": rows, "history": history, "classes": {str(k): v for k, v in class_of.items()}}


def to_markdown(volumes: List[Dict[str, Any]], overall: Dict[str, Any], probe: Dict[str, Any], info: Dict[str, Any]) -> str:
    lines = [f"# 3D evaluation — {info['tokenizer']['source']}", ""]
    for warning in info["warnings"]:
        lines += [f"> **WARNING: {warning}.**", ""]
    lines += [f"{overall['volumes']} volume(s), {overall['slices']} {info['data']['axis']} slices (every "
              f"{info['data']['step']}) at {info['data']['img_size']} px. Paper: {PAPER}, Table S2.", ""]
    best = {r["features"]: r for r in probe.get("rows", [])}
    grid = best.get("grid", {})
    lines += [markdown_table(["", "rFID ↓", "PSNR ↑", "SSIM (%) ↑", "mAP ↑", "AUC ↑"], [
        ["ours", overall["rfid"], overall["psnr"], overall["ssim"], grid.get("best_map"), grid.get("best_auc")],
        ["paper MedITok (Table S2)", TABLE_S2_MEDITOK["rfid"], TABLE_S2_MEDITOK["psnr"], TABLE_S2_MEDITOK["ssim"],
         TABLE_S2_MEDITOK["map"], TABLE_S2_MEDITOK["auc"]]]), ""]
    lines += ["## Per volume", "", markdown_table(
        ["volume", "modality", "shape", "slices", "PSNR (dB)", "SSIM (%)", "worst slice", "label", "split"],
        [[v["identifier"], v["modality"], "×".join(str(s) for s in v["shape"]), v["slices"], v["psnr"], v["ssim"],
          v["worst_slice"], v["label"], v["split"]] for v in volumes]), ""]
    lines += ["## Probe (volume features = mean of slice features)", ""]
    if "rows" in probe:
        lines += [markdown_table(["features", "dim", "train", "test", "classes", "best mAP", "epoch", "best mAP 2-class",
                                  "best AUC", "epoch", "AUC at best val", "mAP at best val"],
                                 [[r["features"], r["feature_dim"], r["n_train"], r["n_test"], r["num_classes"], r["best_map"],
                                   r["best_map_epoch"], r["best_map_two_class"], r["best_auc"], r["best_auc_epoch"],
                                   r["val_selected_auc"], r["val_selected_map"]] for r in probe["rows"]]), ""]
        if any(r["num_classes"] == 2 for r in probe["rows"]):
            lines += ["Binary task: mAP is the AP of the positive class (label 1); 'mAP 2-class' is the mean AP over "
                      "both classes.", ""]
    else:
        lines += [probe["skipped"], ""]
    lines += ["## Conventions", ""] + [f"- **{k}**: {v}" for k, v in info["conventions"].items()]
    lines += [f"- **FID network**: {info['fid_network'].get('network')}, weights {info['fid_network'].get('weights', '–')}", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m evaluation.volume", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data (one of --volumes or --csv)")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--volumes", type=Path, nargs="+", metavar="PATH", help="NIfTI files, DICOM series folders or multi-frame DICOMs")
    source.add_argument("--csv", type=Path, metavar="PATH", help="CSV with identifier (volume path), modality[, label, split]")
    data.add_argument("--root", type=Path, default=None, metavar="DIR", help="folder the CSV's relative identifiers are resolved against")
    data.add_argument("--modality", default=None, metavar="LABEL", help="with --volumes: ct (HU, windowed) or mri (or any other label)")
    data.add_argument("--label-column", default="label", metavar="NAME", help="CSV column with the volume's class (default label)")
    data.add_argument("--ct-window", default=DEFAULT_CT_WINDOW, choices=sorted(CT_WINDOWS),
                      help=f"CT window mapping HU to [-1, 1] (default {DEFAULT_CT_WINDOW})")
    data.add_argument("--axis", default="axial", choices=AXIS_NAMES, help="slicing axis (default axial)")
    data.add_argument("--step", type=int, default=1, metavar="N", help="evaluate every STEP-th slice (default 1: all slices)")
    data.add_argument("--img-size", type=int, default=None, metavar="PX",
                      help="slice resize + centre crop side, a multiple of 16 (default: the model's, 256 for large)")
    add_tokenizer_arguments(parser)
    add_inception_arguments(parser)
    probe = parser.add_argument_group("probe (needs label and split columns in --csv)")
    probe.add_argument("--features", nargs="+", choices=("grid", "pooled"), default=["grid", "pooled"],
                       help="volume feature variants to probe (default: grid pooled)")
    probe.add_argument("--probe-epochs", type=int, default=100, metavar="N", help="probe training epochs (default 100)")
    probe.add_argument("--lr", type=float, default=1e-4, help="probe Adam learning rate (default 1e-4)")
    probe.add_argument("--probe-batch-size", type=int, default=128, metavar="N", help="probe batch size (default 128)")
    run = parser.add_argument_group("run")
    run.add_argument("--batch-size", type=int, default=32, metavar="N", help="slices per tokenizer batch (default 32)")
    run.add_argument("--out", type=Path, default=Path("outputs/volume"), metavar="DIR", help="output folder (default outputs/volume)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.img_size is not None and (args.img_size <= 0 or args.img_size % 16):
        parser.error(f"--img-size {args.img_size} must be a positive multiple of 16")
    if args.step < 1:
        parser.error("--step must be at least 1")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        table = list_volumes(args)
    except MedicalImageError as error:
        raise SystemExit(f"error: {error}") from None
    model, tokenizer_info = load_tokenizer(args)
    device = next(model.parameters()).device
    img_size = args.img_size or model.config.img_size
    axis = AXIS_NAMES.index(args.axis)
    inception, fid_info = build_inception(args, device)
    original_stats = reconstruction_stats = None
    volumes, features = [], {"grid": {}, "pooled": {}}
    for i, row in tqdm(list(table.iterrows()), desc="volumes", unit="volume", disable=args.quiet,
                       **progress_options()):
        try:
            # HU for CT (DICOM rescale applied; NIfTI as stored); refuses volumes holding NaN/Inf voxels.
            raw = read_volume(row["path"])
            signed = volume_to_signed(raw, row["modality"], args.ct_window)
        except MedicalImageError as error:  # its message names the file already
            raise SystemExit(f"error: {error}") from None
        except ValueError as error:
            raise SystemExit(f"error: {row['path']}: {error}") from None
        slices = volume_slices(signed, axis, args.step, img_size)
        try:
            result = evaluate_volume(model, slices, args.batch_size, inception)
        except NonFiniteImageError as error:
            raise SystemExit(f"error: {row['path']}: {error}") from None
        if result["original_features"] is not None:
            if original_stats is None:
                original_stats = GaussianStatistics(fid_inception.FEATURE_DIM)
                reconstruction_stats = GaussianStatistics(fid_inception.FEATURE_DIM)
            original_stats.update(result["original_features"])
            reconstruction_stats.update(result["reconstruction_features"])
        features["grid"][i], features["pooled"][i] = result["grid_mean"], result["pooled_mean"]
        volumes.append({"identifier": row["identifier"], "modality": row["modality"], "shape": list(raw.shape),
                        "slices": result["slices"], "psnr": result["psnr"], "ssim": 100 * result["ssim"],
                        "worst_slice": result["worst_slice"] * args.step, "label": row["label"], "split": row["split"]})
    total_slices = sum(v["slices"] for v in volumes)
    overall = {"volumes": len(volumes), "slices": total_slices,
               "psnr": float(np.mean([v["psnr"] for v in volumes])), "ssim": float(np.mean([v["ssim"] for v in volumes])),
               "rfid": None, "rfid_note": ""}
    if original_stats is not None and original_stats.count >= 2:
        overall["rfid"] = frechet_distance_of(original_stats, reconstruction_stats)
        if total_slices < args.min_fid_images:
            overall["rfid_note"] = f"rFID from only {total_slices} slices (< {args.min_fid_images}): statistically meaningless"
    probe = probe_volumes(table, features, args)
    info = {
        "task": "3D evaluation (paper Table S2)",
        "warnings": labelled_warnings(tokenizer_info, fid_info if args.random_inception and inception else None)
        + ([overall["rfid_note"]] if overall["rfid_note"] else []),
        "tokenizer": tokenizer_info, "fid_network": fid_info,
        "data": {"source": relative(args.csv) if args.csv else [str(p) for p in args.volumes], "axis": args.axis,
                 "step": args.step, "img_size": img_size, "ct_window": args.ct_window},
        "conventions": CONVENTIONS,
        "paper_table_s2_meditok": {**TABLE_S2_MEDITOK, "source": PAPER},
        "environment": environment(device),
        "command": ["python", "-m", "evaluation.volume"] + (sys.argv[1:] if argv is None else list(argv)),
    }
    payload = {**info, "overall": overall, "volumes": volumes, "probe": {k: v for k, v in probe.items() if k != "history"}}
    markdown = to_markdown(volumes, overall, probe, info)
    tables = {"": volumes}
    if "rows" in probe:
        tables.update({"probe": probe["rows"], "probe_history": probe["history"]})
    paths = write_outputs(args.out, "volume", payload, markdown, tables)
    print(markdown)
    print("wrote " + ", ".join(relative(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
