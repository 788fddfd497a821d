#!/usr/bin/env python
"""2D quality control of a metadata CSV (docs/method.md §3, paper appendix A.2.2).

Each image is read exactly as training reads it (read_image, CT through the 'common' window),
turned into its 8-bit RGB proxy, and dropped when
  intensity range (max - min) < 50, shortest side < 128 px, std < 10, or <= 3 distinct values.
Unreadable files (missing, empty, truncated, undecodable, 8-bit PNG on a `ct` row...) are dropped
too, with the reader's message as the reason.

Example:
  python scripts/data/quality_control.py --csv datasets/meta/examples_train.csv \\
      --root datasets/examples --workers 2 \\
      --kept outputs/qc/examples_train_kept.csv --dropped outputs/qc/examples_train_dropped.csv

Writes <csv stem>_kept.csv (the rows that pass, all columns as they were) and
<csv stem>_dropped.csv (the rows that fail, plus a `reason` column) next to the input unless
--kept / --dropped say otherwise, and prints a summary of the reasons.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from functools import partial
from multiprocessing import Pool
from pathlib import Path

from tqdm import tqdm

from meditok.data import (
    ImageQualityThresholds,
    MedicalImageError,
    image_rejection_reasons,
    read_image,
    rgb_proxy,
)
from meditok.data.samples import read_metadata_csv, resolve_identifier


def check_one(item, root, thresholds: ImageQualityThresholds) -> str:
    """'' when the image passes, else the reasons joined by '; '."""
    identifier, modality = item
    try:
        image = read_image(resolve_identifier(identifier, root), modality or None)
    except MedicalImageError as error:
        return f"unreadable: {error.reason}"
    return "; ".join(image_rejection_reasons(rgb_proxy(image), thresholds))


def reason_kinds(reasons: str) -> list[str]:
    """'std 3.2 < 10; short side 64 px < 128' -> ['std', 'short side'] (for the summary)."""
    kinds = []
    for reason in reasons.split("; "):
        if reason.startswith("unreadable"):
            kinds.append("unreadable")
        elif "distinct value" in reason:
            kinds.append("distinct values")
        else:
            kinds.append(re.split(r"\s[-\d.]", reason, maxsplit=1)[0])
    return kinds


def main(argv: list[str] | None = None) -> int:
    defaults = ImageQualityThresholds()
    parser = argparse.ArgumentParser(
        description=__doc__.split("Example:", 1)[0].strip(),
        epilog="example:" + __doc__.split("Example:", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--csv", type=Path, required=True, help="metadata CSV to check")
    parser.add_argument("--root", type=Path, help="folder the identifiers are relative to")
    parser.add_argument(
        "--kept", type=Path, help="output CSV of passing rows (default: <csv>_kept.csv)"
    )
    parser.add_argument(
        "--dropped",
        type=Path,
        help="output CSV of failing rows with `reason` (default: <csv>_dropped.csv)",
    )
    parser.add_argument(
        "--image-column",
        default="identifier",
        help="column holding image paths (default: %(default)s)",
    )
    parser.add_argument(
        "--modality-column",
        default="modality",
        help="column holding modalities (default: %(default)s)",
    )
    parser.add_argument("--sep", default=",", help="CSV separator (default: %(default)s)")
    parser.add_argument(
        "--workers", type=int, default=2, help="processes reading images (default: %(default)s)"
    )
    parser.add_argument(
        "--min-intensity-range",
        type=float,
        default=defaults.min_intensity_range,
        help="drop images whose max - min (0..255 proxy) is below this (default: %(default)s)",
    )
    parser.add_argument(
        "--min-short-side",
        type=int,
        default=defaults.min_short_side,
        help="drop images whose shorter side (px) is below this (default: %(default)s)",
    )
    parser.add_argument(
        "--min-std",
        type=float,
        default=defaults.min_std,
        help="drop images whose std (0..255 proxy) is below this (default: %(default)s)",
    )
    parser.add_argument(
        "--max-distinct-values-dropped",
        type=int,
        default=defaults.max_distinct_values_dropped,
        help="drop images with at most this many distinct values (default: %(default)s)",
    )
    args = parser.parse_args(argv)

    table = read_metadata_csv(
        args.csv, [args.image_column, args.modality_column], sep=args.sep, keep_all_columns=True
    )
    thresholds = ImageQualityThresholds(
        args.min_intensity_range,
        args.min_short_side,
        args.min_std,
        args.max_distinct_values_dropped,
    )
    items = list(zip(table[args.image_column], table[args.modality_column]))
    check = partial(check_one, root=args.root, thresholds=thresholds)
    progress = partial(tqdm, total=len(items), desc="quality control", unit="img")
    if args.workers > 1:
        with Pool(args.workers) as pool:
            reasons = list(progress(pool.imap(check, items, chunksize=16)))
    else:
        reasons = [check(item) for item in progress(items)]

    stem = args.csv.with_suffix("")
    kept_path = args.kept or Path(f"{stem}_kept.csv")
    dropped_path = args.dropped or Path(f"{stem}_dropped.csv")
    for path in (kept_path, dropped_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    passed = [r == "" for r in reasons]
    table[passed].to_csv(kept_path, sep=args.sep, index=False, lineterminator="\n")
    dropped = table[[not p for p in passed]].copy()
    dropped["reason"] = [r for r in reasons if r]
    dropped.to_csv(dropped_path, sep=args.sep, index=False, lineterminator="\n")

    counts = Counter(kind for r in reasons if r for kind in reason_kinds(r))
    print(f"checked {len(items)} images: {sum(passed)} kept, {len(items) - sum(passed)} dropped")
    for kind, count in counts.most_common():
        print(f"  {kind}: {count}")
    print(f"kept: {kept_path}\ndropped: {dropped_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
