#!/usr/bin/env python
"""Convert CT and MRI volumes to 2D training slices the way the paper did (docs/method.md §3).

CT: Hounsfield units (DICOM rescale slope/intercept applied) clipped to [-1000, 2000]; every 5th
slice along each of the three axes; a slice is kept when background ratio (HU <= -1000) <= 0.6,
body ratio (HU >= -300) >= 0.1 and HU std < 100; kept slices are 16-bit PNGs holding HU + 1024.
MRI: the volume is clipped to its 0.5th-99.5th percentiles and scaled to [-1, 1]; same slicing;
a slice is dropped when its mean <= -0.9 or its std <= 0.2; kept slices are 8-bit PNGs.

Examples:
  # every NIfTI in a folder, all CT
  python scripts/data/slice_volumes.py --inputs scans/*.nii.gz --modality ct --out-dir slices/
  # a CSV listing volumes (identifier, modality, optional caption) relative to --root
  python scripts/data/slice_volumes.py --input-csv volumes.csv --root raw/ --out-dir slices/

Writes the PNGs under --out-dir/<volume file stem>/<axis>_<index>.png (two volumes with the same
stem: <stem>, <stem>_2, ...) and a metadata CSV (identifier relative to --out-dir, caption, modality,
source, axis, slice_index) ready for CSVImageDataset(..., root=--out-dir) and
scripts/data/quality_control.py.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from meditok.data import (
    CTSliceThresholds,
    MedicalImageError,
    MRISliceThresholds,
    iter_volume_slices,
    normalise_modality,
    read_volume,
)
from meditok.data.reading import AXIS_NAMES
from meditok.data.samples import read_metadata_csv, resolve_identifier
from meditok.data.slicing import SLICE_STEP, VOLUME_MODALITIES, save_slice_png

OUTPUT_COLUMNS = ("identifier", "caption", "modality", "source", "axis", "slice_index")


def volume_name(identifier: str) -> str:
    """A file-system-safe folder name for a volume's slices: the file's stem (``scans/anatomical.nii.gz`` →
    ``anatomical``) or the DICOM series folder's name."""
    stem = re.sub(r"(\.nii\.gz|\.nii|\.dcm)$", "", Path(identifier.strip().rstrip("/\\")).name, flags=re.I)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("_.") or "volume"


def volume_names(identifiers: list[str]) -> dict[str, str]:
    """``volume_name`` of each distinct identifier, made unique in input order: the second ``a/ct.nii`` and
    ``b/ct.nii`` becomes ``ct_2`` (the metadata CSV's ``source`` column keeps the full path)."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for identifier in identifiers:
        if identifier in names:
            continue
        base = name = volume_name(identifier)
        n = 1
        while name.lower() in taken:  # case-insensitive: folders must not clash on macOS/Windows either
            n += 1
            name = f"{base}_{n}"
        names[identifier] = name
        taken.add(name.lower())
    return names


def reason_kind(reason: str) -> str:
    """'HU std 512.30 >= 100' -> 'HU std' (for the summary)."""
    return re.split(r"\s[-\d.]", reason, maxsplit=1)[0]


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("Examples:", 1)[0].strip(),
        epilog="examples:" + __doc__.split("Examples:", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_argument_group("input (one of)")
    source.add_argument(
        "--inputs",
        nargs="+",
        type=Path,
        metavar="PATH",
        help=".nii/.nii.gz files, DICOM series folders or multi-frame DICOMs",
    )
    source.add_argument(
        "--input-csv",
        type=Path,
        metavar="CSV",
        help="CSV listing volumes: identifier, modality (ct or mri), optional caption",
    )
    parser.add_argument("--modality", choices=VOLUME_MODALITIES, help="modality of --inputs")
    parser.add_argument("--caption", default="", help="caption for slices of --inputs")
    parser.add_argument("--root", type=Path, help="folder the CSV identifiers are relative to")
    parser.add_argument(
        "--sep", default=",", help="separator of --input-csv (default: %(default)s)"
    )
    parser.add_argument("--out", "--out-dir", dest="out_dir", type=Path, required=True, help="where PNGs and the CSV go")
    parser.add_argument(
        "--csv-out", type=Path, help="metadata CSV to write (default: <out-dir>/slices.csv)"
    )
    parser.add_argument(
        "--dropped-csv",
        type=Path,
        help="also list every dropped slice with its reason (no PNG written)",
    )
    parser.add_argument(
        "--step",
        type=int,
        default=SLICE_STEP,
        help="keep every N-th slice along each axis (default: %(default)s, as the paper)",
    )
    parser.add_argument(
        "--on-error",
        choices=("raise", "skip"),
        default="raise",
        help="an unreadable volume stops the run (raise) or is skipped "
        "and listed in the summary (skip) (default: %(default)s)",
    )
    ct, mri = CTSliceThresholds(), MRISliceThresholds()
    rules = parser.add_argument_group("slice rules (paper defaults)")
    rules.add_argument(
        "--ct-max-background-ratio",
        type=float,
        default=ct.max_background_ratio,
        help="keep CT slices whose fraction of pixels <= -1000 HU is at most this "
        "(default: %(default)s)",
    )
    rules.add_argument(
        "--ct-min-body-ratio",
        type=float,
        default=ct.min_body_ratio,
        help="keep CT slices whose fraction of pixels >= -300 HU is at least this "
        "(default: %(default)s)",
    )
    rules.add_argument(
        "--ct-max-std",
        type=float,
        default=ct.max_std,
        help="keep CT slices with HU std below this (paper as printed: 100; real "
        "body slices have a std of several hundred HU, so most are dropped; "
        "pass inf to disable this rule) (default: %(default)s)",
    )
    rules.add_argument(
        "--mri-max-mean-dropped",
        type=float,
        default=mri.max_mean_dropped,
        help="drop MRI slices whose mean (in [-1, 1]) is at most this (default: %(default)s)",
    )
    rules.add_argument(
        "--mri-max-std-dropped",
        type=float,
        default=mri.max_std_dropped,
        help="drop MRI slices whose std (in [-1, 1]) is at most this (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if (args.inputs is None) == (args.input_csv is None):
        parser.error("give either --inputs (with --modality) or --input-csv")
    if args.inputs is not None and args.modality is None:
        parser.error("--inputs needs --modality ct or --modality mri")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.inputs is not None:
        volumes = [(str(p), args.modality, args.caption, p) for p in args.inputs]
    else:
        table = read_metadata_csv(args.input_csv, ["identifier", "modality"], ["caption"], args.sep)
        volumes = []
        for row, record in enumerate(table.to_dict("records")):
            modality = normalise_modality(record["modality"])
            if modality not in VOLUME_MODALITIES:
                raise MedicalImageError(
                    args.input_csv,
                    f"modality {record['modality']!r} at line {row + 2} is not one "
                    f"of {VOLUME_MODALITIES}",
                    "only CT and MRI volumes are sliced",
                )
            path = resolve_identifier(record["identifier"], args.root)
            volumes.append((record["identifier"], modality, record.get("caption", ""), path))

    ct_rules = CTSliceThresholds(
        args.ct_max_background_ratio, args.ct_min_body_ratio, args.ct_max_std
    )
    mri_rules = MRISliceThresholds(args.mri_max_mean_dropped, args.mri_max_std_dropped)
    csv_out = args.csv_out or args.out_dir / "slices.csv"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    csv_out.parent.mkdir(parents=True, exist_ok=True)

    folder_of = volume_names([identifier for identifier, *_ in volumes])
    kept_total, candidates_total, failed = 0, 0, []
    dropped_reasons: Counter[str] = Counter()
    dropped_rows = []
    with open(csv_out, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(OUTPUT_COLUMNS)
        progress = tqdm(volumes, desc="volumes", unit="vol")
        for identifier, modality, caption, path in progress:
            try:
                volume = read_volume(path)
            except MedicalImageError as error:
                if args.on_error == "raise":
                    raise
                failed.append(str(error))
                continue
            name = folder_of[identifier]
            for candidate in iter_volume_slices(volume, modality, args.step, ct_rules, mri_rules):
                candidates_total += 1
                axis = AXIS_NAMES[candidate.axis]
                if not candidate.kept:
                    dropped_reasons.update(reason_kind(r) for r in candidate.reasons)
                    dropped_rows.append(
                        (identifier, axis, candidate.index, "; ".join(candidate.reasons))
                    )
                    continue
                slice_id = f"{name}/{axis}_{candidate.index:04d}.png"
                save_slice_png(args.out_dir / slice_id, candidate, modality)
                writer.writerow([slice_id, caption, modality, identifier, axis, candidate.index])
                kept_total += 1
            progress.set_postfix(kept=kept_total, dropped=candidates_total - kept_total)

    if args.dropped_csv is not None:
        args.dropped_csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.dropped_csv, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(("source", "axis", "slice_index", "reason"))
            writer.writerows(dropped_rows)

    print(f"volumes: {len(volumes) - len(failed)} sliced, {len(failed)} unreadable")
    print(
        f"slices: {candidates_total} candidates (every {args.step}th per axis), "
        f"{kept_total} kept, {candidates_total - kept_total} dropped"
    )
    for kind, count in dropped_reasons.most_common():
        print(f"  dropped for {kind}: {count}")
    if candidates_total and dropped_reasons.get("HU std", 0) > 0.5 * candidates_total:
        print(
            "  note: most CT slices fail 'HU std < --ct-max-std' (the paper's rule as printed); "
            "pass --ct-max-std inf if that is not what you want"
        )
    print(f"metadata: {csv_out} (identifiers relative to {args.out_dir})")
    if args.dropped_csv is not None:
        print(f"dropped slices: {args.dropped_csv}")
    for message in failed:
        print(f"  unreadable: {message}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
