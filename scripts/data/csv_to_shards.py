#!/usr/bin/env python
"""Pack a metadata CSV and its images into webdataset tar shards for streaming training.

Each sample keeps the original file's bytes (PNG, DICOM, NIfTI...) plus a JSON record
(identifier, caption, modality, CSV line), so ShardedImageDataset decodes it with the same
read_image as a file on disk. An index.json lists the shards and their sample counts.

Example:
  python scripts/data/csv_to_shards.py --csv datasets/meta/examples_train.csv \\
      --root datasets/examples --out-dir /tmp/example_shards --shard-size 8
  python -c "from meditok.data import ShardedImageDataset as S; \\
             print(next(iter(S('/tmp/example_shards')))['identifier'])"

Use at least (number of GPUs) x (DataLoader workers) shards, ideally many more: shards, not
samples, are divided among ranks and workers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from meditok.data import MedicalImageError, write_shards
from meditok.data.samples import BAD_SAMPLES_FILE, read_metadata_csv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("Example:", 1)[0].strip(),
        epilog="example:" + __doc__.split("Example:", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--csv", type=Path, required=True, help="metadata CSV (identifier, caption, modality)"
    )
    parser.add_argument("--root", type=Path, help="folder the identifiers are relative to")
    parser.add_argument(
        "--out", "--out-dir", dest="out_dir", type=Path, required=True, help="folder for the shards and index.json"
    )
    parser.add_argument(
        "--shard-size", type=int, default=1000, help="samples per shard (default: %(default)s)"
    )
    parser.add_argument(
        "--prefix", default="shard", help="shard file name prefix (default: %(default)s)"
    )
    parser.add_argument(
        "--image-column",
        default="identifier",
        help="column holding image paths (default: %(default)s)",
    )
    parser.add_argument(
        "--caption-column", default="caption", help="column holding captions (default: %(default)s)"
    )
    parser.add_argument(
        "--modality-column",
        default="modality",
        help="column holding modalities (default: %(default)s)",
    )
    parser.add_argument("--sep", default=",", help="CSV separator (default: %(default)s)")
    parser.add_argument(
        "--no-validate",
        action="store_true",
        help="do not decode each image while packing (faster, finds bad files later)",
    )
    parser.add_argument(
        "--on-error",
        choices=("raise", "skip"),
        default="raise",
        help="a bad image stops the run (raise) or is left out and listed "
        f"in <out-dir>/{BAD_SAMPLES_FILE} (skip)",
    )
    args = parser.parse_args(argv)
    try:
        return pack(args)
    except MedicalImageError as error:  # a user's file: one line naming it, no traceback
        raise SystemExit(f"csv_to_shards: {error}") from None


def pack(args: argparse.Namespace) -> int:
    rows = len(read_metadata_csv(args.csv, [args.image_column], sep=args.sep))
    if rows == 0:
        raise SystemExit(f"csv_to_shards: {args.csv} has a header but no rows: nothing to pack. Fix: list one image "
                         f"per line under the header ({args.image_column}, {args.caption_column}, "
                         f"{args.modality_column}).")
    summary = write_shards(
        args.csv,
        args.out_dir,
        args.root,
        image_column=args.image_column,
        caption_column=args.caption_column,
        modality_column=args.modality_column,
        sep=args.sep,
        shard_size=args.shard_size,
        prefix=args.prefix,
        validate=not args.no_validate,
        on_error=args.on_error,
        progress=True,
    )
    if summary["num_samples"] == 0:
        raise SystemExit(f"csv_to_shards: none of the {rows} images of {args.csv} could be packed (all bad, see "
                         f"{args.out_dir / BAD_SAMPLES_FILE}); no shard was written.")
    size = sum((args.out_dir / s["name"]).stat().st_size for s in summary["shards"])
    print(
        f"wrote {summary['num_samples']} samples in {len(summary['shards'])} shard(s) "
        f"({size / 1e6:.2f} MB) to {args.out_dir}"
    )
    if summary["skipped"]:
        print(f"skipped {summary['skipped']} bad image(s): see {args.out_dir / BAD_SAMPLES_FILE}")
    print(f"index: {args.out_dir / 'index.json'}; read with ShardedImageDataset('{args.out_dir}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
