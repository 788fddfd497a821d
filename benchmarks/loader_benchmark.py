#!/usr/bin/env python
"""Measure data-loading throughput (images/s) of the training input pipeline on this machine.

Runs the stage-1 training pipeline (read_image, random CT window, stage-1 augmentation to --size)
through a DataLoader with --workers processes, over the example set by default, for --epochs
passes, and reports images/s after the first batch (worker start-up is excluded). With --shards
it also packs the CSV into webdataset shards in a temporary folder and measures
ShardedImageDataset the same way.

Example:
  python benchmarks/loader_benchmark.py --workers 2 --size 128 --epochs 60 --shards
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]

from meditok.data import (
    CSVImageDataset,
    RandomCTWindow,
    ShardedImageDataset,
    make_worker_init_fn,
    stage1_augmentation,
    write_shards,
)


def measure(loader: DataLoader, epochs: int, label: str) -> tuple[int, float]:
    """(images after the first batch, seconds they took)."""
    images, start = 0, None
    with tqdm(total=None, desc=label, unit="img") as bar:
        for epoch in range(epochs):
            if hasattr(loader.dataset, "set_epoch"):
                loader.dataset.set_epoch(epoch)
            for batch in loader:
                count = batch["image"].shape[0]
                if start is None:  # the first batch pays for starting the workers
                    start = time.perf_counter()
                else:
                    images += count
                bar.update(count)
    return images, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("Example:", 1)[0].strip(),
        epilog="example:" + __doc__.split("Example:", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--csv",
        type=Path,
        default=REPO_ROOT / "datasets/meta/examples_train.csv",
        help="metadata CSV to load (default: %(default)s)",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=REPO_ROOT / "datasets/examples",
        help="folder the CSV identifiers are relative to (default: %(default)s)",
    )
    parser.add_argument(
        "--size", type=int, default=128, help="training image size (px) (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="images per batch (default: %(default)s)"
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="DataLoader worker processes (default: %(default)s)"
    )
    parser.add_argument(
        "--epochs", type=int, default=60, help="passes over the CSV (default: %(default)s)"
    )
    parser.add_argument("--shards", action="store_true", help="also measure webdataset shards")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of shuffling and augmentation (default: %(default)s)",
    )
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # one thread per worker process, as a training job would set it
    common = dict(
        batch_size=args.batch_size,
        num_workers=args.workers,
        worker_init_fn=make_worker_init_fn(args.seed, rank=0),
        persistent_workers=args.workers > 0,
    )
    dataset = CSVImageDataset(
        args.csv, args.root, transform=stage1_augmentation(args.size), ct_window=RandomCTWindow()
    )
    results = [
        (
            "CSVImageDataset",
            *measure(DataLoader(dataset, shuffle=True, **common), args.epochs, "csv"),
        )
    ]
    if args.shards:
        with tempfile.TemporaryDirectory() as shard_dir:
            shard_size = max(1, len(dataset) // max(1, 2 * args.workers))
            write_shards(args.csv, shard_dir, args.root, shard_size=shard_size)
            sharded = ShardedImageDataset(
                shard_dir,
                transform=stage1_augmentation(args.size),
                ct_window=RandomCTWindow(),
                shuffle=True,
                shuffle_buffer=64,
                seed=args.seed,
            )
            loader = DataLoader(sharded, **common)
            results.append(("ShardedImageDataset", *measure(loader, args.epochs, "shards")))

    print(
        f"\n{len(dataset)} images x {args.epochs} epochs, {args.size} px, batch {args.batch_size}, "
        f"{args.workers} workers, {torch.get_num_threads()} thread(s) in the main process"
    )
    for label, images, seconds in results:
        print(
            f"  {label:20s} {images / seconds:8.1f} images/s  ({images} images in {seconds:.2f} s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
