"""Linear probe on a frozen tokenizer — the paper's Table 2 (MedMNIST v2, mAP and AUC) from one command.

Protocol (docs/method.md §4): images resized to --img-size (default: the tokenizer's own size, 256 for the
released model, as in the paper; MedMNIST's 224-px files there), encoded by the frozen tokenizer; one linear layer trained with Adam (lr 1e-4, batch 128) on the train split; test
metrics after every epoch; the best (peak) test mAP and the best test AUC over the epochs are reported,
as in the paper. The test metrics at the epoch of best validation AUC are reported beside them when a
validation split exists (a protocol that does not look at the test set).

Feature variants (--features):
  grid    the quantised token grid flattened: [L x 64] per image (L = (img_size/16)^2; 16,384-d at 256 px),
          each 8-d chunk the unit-norm codeword of one of the 8 codebooks (the paper's probe input)
  pooled  the post-quantisation tokens averaged over the grid ([vit_width], 1,024-d for large): the vector
          MedITok's alignment head reads

Metrics (in %), from float64 log-odds of the probe's logits (no saturated probabilities): AUC = one-vs-rest
ROC AUC averaged over classes (multi-class; binary tasks are 2-class, where this equals the plain AUC) or
over labels (multi-label, e.g. ChestMNIST); mAP = average precision averaged the same way, except binary
tasks: AP of the positive class (label 1), with the mean over both classes in a second column
("mAP 2-class"); ACC = argmax accuracy (multi-label: element-wise at 0.5). The average row covers the
paper's five Table 2 datasets only; other datasets are averaged separately. A class with fewer than
10 train or test images (a label with fewer than 10 positives) gives a warning: its peaks are noise.

Cache: token ids and pooled features are cached under --cache-dir (default: OUT/cache), keyed by the
tokenizer's weights, the image size, the split and the SHA-1 of the contents of the data: the .npz file,
or the CSV and every image file it lists. Changing any image therefore re-encodes (hashing costs one read of
the files per run); --no-cache always re-encodes and writes nothing.

Examples:
  # MedMNIST files as the medmnist package writes them (e.g. ~/.medmnist/breastmnist_224.npz)
  python -m evaluation.linear_probe --checkpoint weights/meditok_simple_v1.pth --medmnist-root ~/.medmnist
  python -m evaluation.linear_probe --checkpoint weights/meditok_simple_v1.pth --npz data/chestmnist_224.npz
  # image lists: CSVs with identifier + a label column (or several 0/1 columns for multi-label)
  python -m evaluation.linear_probe --checkpoint weights/meditok_simple_v1.pth \\
      --train-csv train.csv --test-csv test.csv --root images/ --label-column label
  # smoke test (numbers meaningless)
  python -m evaluation.linear_probe --preset tiny --random-weights --npz tiny.npz --img-size 64 --epochs 3

Writes linear_probe.json, .md, .csv (one row per dataset and feature variant) and
linear_probe_history.csv (every epoch's test metrics) to --out.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from meditok.data import MedicalImageError

# The probe lives in probe_data, probe_features, probe_training and probe_report; every name this module
# defined before the split is re-exported here, so `from evaluation.linear_probe import X` keeps working.
from .paper import PAPER, TABLE2_DATASETS, TABLE2_MEDITOK_AVERAGE
from .probe_data import (MIN_IMAGES_PER_CLASS, MULTI_CLASS, MULTI_LABEL, SPLITS, ProbeDataError, ProbeDataset,
                         _npz_member, _read_npy_header, csv_dataset, find_medmnist_file, how_to_download, infer_task,
                         iter_npz_rows, medmnist_dataset, npz_array_shape, npz_has_split, read_npz_labels,
                         small_sample_warnings)
from .probe_features import (CACHE_FORMAT, FEATURE_VARIANTS, FeatureTable, _has_column, content_hash, data_fingerprint,
                             extract_features, feature_cache_path, load_or_extract, uint8_batch_to_model_input)
from .probe_report import PROTOCOL, _task_label, probe_averages, table2_dataset, to_markdown
from .probe_training import ProbeResult, predict, train_linear_probe
from .report import environment, relative, write_outputs
from .tokenizer import add_tokenizer_arguments, labelled_warnings, load_tokenizer, tokenizer_fingerprint

# what this module re-exports (its names before the split), so pyflakes and readers know they are meant
__all__ = [
    "CACHE_FORMAT",
    "MIN_IMAGES_PER_CLASS",
    "MULTI_CLASS",
    "MULTI_LABEL",
    "ProbeResult",
    "SPLITS",
    "_has_column",
    "_npz_member",
    "_read_npy_header",
    "_task_label",
    "content_hash",
    "data_fingerprint",
    "extract_features",
    "feature_cache_path",
    "how_to_download",
    "infer_task",
    "iter_npz_rows",
    "npz_array_shape",
    "npz_has_split",
    "predict",
    "read_npz_labels",
    "table2_dataset",
    "uint8_batch_to_model_input",
]


# --------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m evaluation.linear_probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data (MedMNIST .npz files and/or CSV image lists)")
    data.add_argument("--medmnist-root", type=Path, default=None, metavar="DIR",
                      help="folder of MedMNIST .npz files as the medmnist package writes them (e.g. ~/.medmnist)")
    data.add_argument("--datasets", nargs="+", default=list(TABLE2_DATASETS), metavar="NAME",
                      help=f"with --medmnist-root: which datasets (default: Table 2's {' '.join(TABLE2_DATASETS)}; "
                           "chestmnist is multi-label)")
    data.add_argument("--medmnist-size", type=int, default=224, choices=(28, 64, 128, 224),
                      help="which MedMNIST file size to look for: NAME_SIZE.npz, else NAME.npz (default 224, the paper's)")
    data.add_argument("--npz", type=Path, nargs="+", default=[], metavar="FILE", help="explicit MedMNIST-format .npz files")
    data.add_argument("--train-csv", type=Path, metavar="PATH", help="CSV image list for training (identifier + labels)")
    data.add_argument("--val-csv", type=Path, metavar="PATH", help="optional validation CSV (adds test metrics at the best-val epoch)")
    data.add_argument("--test-csv", type=Path, metavar="PATH", help="CSV image list for testing")
    data.add_argument("--root", type=Path, default=None, metavar="DIR", help="folder CSV identifiers are relative to")
    data.add_argument("--label-column", default=None, metavar="NAME", help="CSV column with one class (id or name) per image")
    data.add_argument("--label-columns", nargs="+", default=None, metavar="NAME", help="CSV 0/1 columns, one per label (multi-label)")
    data.add_argument("--name", default="csv", help="name of the CSV task in the tables (default csv)")
    data.add_argument("--max-samples", type=int, default=None, metavar="N", help="only the first N images of each split (smoke tests)")
    add_tokenizer_arguments(parser)
    probe = parser.add_argument_group("probe")
    probe.add_argument("--features", nargs="+", choices=FEATURE_VARIANTS, default=list(FEATURE_VARIANTS),
                       help="feature variants to probe (default: grid pooled)")
    probe.add_argument("--img-size", type=int, default=None, metavar="PX",
                       help="images are resized to this, a multiple of 16 (default: the tokenizer's own size, "
                            "256 for the released model, the paper's)")
    probe.add_argument("--epochs", type=int, default=100, metavar="N", help="training epochs; peaks are taken over them (default 100)")
    probe.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4, the paper's)")
    probe.add_argument("--batch-size", type=int, default=128, metavar="N", help="probe batch size (default 128, the paper's)")
    probe.add_argument("--encode-batch-size", type=int, default=64, metavar="N", help="images per tokenizer batch (default 64)")
    probe.add_argument("--num-workers", type=int, default=2, metavar="N", help="DataLoader workers for CSV images (default 2)")
    probe.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                       help="where token ids / pooled features are cached, keyed by the content of the data files and "
                            "images (default: OUT/cache)")
    probe.add_argument("--no-cache", action="store_true", help="always re-encode, read and write no cache")
    probe.add_argument("--out", type=Path, default=Path("outputs/linear_probe"), metavar="DIR", help="output folder (default outputs/linear_probe)")
    probe.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.img_size is not None and (args.img_size <= 0 or args.img_size % 16):
        parser.error(f"--img-size {args.img_size} must be a positive multiple of 16")
    has_csv = bool(args.train_csv or args.test_csv)
    if has_csv and not (args.train_csv and args.test_csv):
        parser.error("CSV probing needs both --train-csv and --test-csv")
    if not (args.medmnist_root or args.npz or has_csv):
        parser.error("no data: pass --medmnist-root DIR (MedMNIST .npz files), --npz FILE ..., or --train-csv/--test-csv")
    return args


def collect_datasets(args: argparse.Namespace) -> List[ProbeDataset]:
    files = list(args.npz)
    if args.medmnist_root:
        files += [find_medmnist_file(args.medmnist_root.expanduser(), name.lower(), args.medmnist_size)
                  for name in args.datasets]
    datasets = [medmnist_dataset(path, args.max_samples) for path in files]
    if args.train_csv:
        csvs = {"train": args.train_csv, "test": args.test_csv}
        if args.val_csv:
            csvs["val"] = args.val_csv
        datasets.append(csv_dataset(args.name, csvs, args.root, args.label_column, args.label_columns, args.max_samples))
    return datasets


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        datasets = collect_datasets(args)
    except ProbeDataError as error:
        raise SystemExit(f"error: {error}") from None
    model, tokenizer_info = load_tokenizer(args)
    device = next(model.parameters()).device
    codebooks = model.quantizer.normalized_codebooks().detach()
    tokenizer_key = tokenizer_fingerprint(model)
    img_size = args.img_size or model.config.img_size
    cache_dir = None if args.no_cache else (args.cache_dir or args.out / "cache")
    sample_warnings = [w for dataset in datasets for w in small_sample_warnings(dataset)]
    rows, history_rows, per_dataset, notes = [], [], [], []
    for dataset in datasets:
        notes += [f"{dataset.name}: {n}" for n in dataset.notes]
        features, status = {}, {}
        for split in dataset.splits:
            try:
                features[split], status[split] = load_or_extract(
                    model, dataset, split, img_size=img_size, batch_size=args.encode_batch_size,
                    num_workers=args.num_workers, cache_dir=cache_dir, tokenizer_key=tokenizer_key,
                    max_samples=args.max_samples, progress=not args.quiet)
            except (MedicalImageError, ProbeDataError) as error:
                raise SystemExit(f"error: {error}") from None
        entry = {"dataset": dataset.name, "source": dataset.source, "task": dataset.task,
                 "num_classes": dataset.num_classes, "class_names": dataset.class_names,
                 "splits": {s: len(dataset.labels[s]) for s in dataset.splits}, "features": status, "results": {}}
        for variant in args.features:
            def table(split):
                if variant == "grid":
                    return FeatureTable.from_ids(features[split]["ids"], codebooks)
                return FeatureTable.from_dense(features[split]["pooled"])

            has_val = "val" in dataset.splits
            result = train_linear_probe(
                table("train"), dataset.labels["train"], table("test"), dataset.labels["test"], task=dataset.task,
                num_classes=dataset.num_classes, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                seed=args.seed, device=str(device), val=table("val") if has_val else None,
                val_labels=dataset.labels.get("val"), progress=not args.quiet, desc=f"probe {dataset.name}/{variant}")
            row = {"dataset": dataset.name, "features": variant, "feature_dim": result.feature_dim, "task": dataset.task,
                   "num_classes": dataset.num_classes, "n_train": len(dataset.labels["train"]),
                   "n_test": len(dataset.labels["test"]), "best_map": result.best_map["map"],
                   "best_map_epoch": result.best_map["epoch"],
                   "best_map_two_class": result.best_map_two_class["map_two_class"],
                   "best_auc": result.best_auc["auc"],
                   "best_auc_epoch": result.best_auc["epoch"], "acc_at_best_auc": result.best_auc["acc"],
                   "final_map": result.final["map"], "final_auc": result.final["auc"], "seconds": result.seconds}
            if result.val_selected:  # test metrics at the epoch of best validation AUC
                row.update({"val_selected_epoch": result.val_selected["epoch"],
                            "val_selected_auc": result.val_selected["auc"], "val_selected_map": result.val_selected["map"]})
            rows.append(row)
            history_rows += [{"dataset": dataset.name, "features": variant, **h} for h in result.history]
            entry["results"][variant] = {"best_map": result.best_map, "best_auc": result.best_auc,
                                         "val_selected": result.val_selected, "final": result.final,
                                         "feature_dim": result.feature_dim, "seconds": result.seconds}
        per_dataset.append(entry)
    averages, other_averages = probe_averages(rows, args.features)
    info = {
        "task": "linear probe (paper Table 2)",
        "warnings": labelled_warnings(tokenizer_info) + sample_warnings,
        "tokenizer": tokenizer_info,
        "settings": {"img_size": img_size, "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                     "seed": args.seed, "features": args.features, "max_samples": args.max_samples},
        "protocol": PROTOCOL,
        "notes": notes,
        "paper_table2_meditok_average": {**TABLE2_MEDITOK_AVERAGE, "datasets": list(TABLE2_DATASETS), "source": PAPER},
        "environment": environment(device),
        "command": ["python", "-m", "evaluation.linear_probe"] + (sys.argv[1:] if argv is None else list(argv)),
    }
    payload = {**info, "results": rows, "average": averages, "average_other_datasets": other_averages,
               "datasets": per_dataset}
    markdown = to_markdown(rows, averages, info, other_averages)
    paths = write_outputs(args.out, "linear_probe", payload, markdown, {"": rows, "history": history_rows})
    print(markdown)
    print("wrote " + ", ".join(relative(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
