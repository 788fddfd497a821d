"""Turn a dataset of images into a token cache (ids.npy + meta.csv + manifest.json) for generators.

Examples::

    # the bundled examples, with the quick-start tokenizer
    python -m generation.tokenize_dataset --checkpoint runs/stage2_tiny/tokenizer \\
        --csv datasets/meta/examples_train.csv --root datasets/examples --out runs/tokens/examples_train --flip
    # MedMNIST subsets for Table 3 (label = subset name), the released tokenizer, 256 px
    python -m generation.tokenize_dataset --checkpoint weights/meditok_simple_v1.pth --img-size 256 \\
        --medmnist ~/.medmnist/{blood,breast,chest,derma,path,retina}mnist_224.npz --split train --out runs/tokens/medmnist_train
    # several GPUs: each rank tokenizes its chunks, rank 0 writes the manifest
    torchrun --nproc_per_node 8 -m generation.tokenize_dataset --checkpoint ... --csv ... --out ...

Run the same command again after a kill: finished chunks are kept.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

import meditok
from training import distributed
from .token_cache import TokenCache, TokenCacheError, label_coverage_warning, write_token_cache


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m generation.tokenize_dataset", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    tok = parser.add_argument_group("tokenizer")
    tok.add_argument("--checkpoint", metavar="SOURCE",
                     help="MedITok weights: any source meditok.load_meditok accepts (weights/meditok_simple_v1.pth, "
                          "a training checkpoint, a saved folder such as runs/stage2_tiny/tokenizer, a Hub id)")
    tok.add_argument("--random-tokenizer", metavar="PRESET", default=None,
                     help="use a randomly initialised tokenizer of this preset (seed 0) instead of --checkpoint: for "
                          "smoke tests only; it is saved to OUT/tokenizer so samples can be decoded later")
    src = parser.add_argument_group("images (one of)")
    src.add_argument("--csv", help="metadata CSV with identifier, caption, modality columns (as for training)")
    src.add_argument("--root", default=None, help="folder the CSV's identifiers are relative to")
    src.add_argument("--allow-outside-root", action="store_true",
                     help="accept CSV rows that lead outside --root (absolute paths, '..', symlinks) and "
                          "symlinks in --folder that lead outside it; by default such rows are refused")
    src.add_argument("--folder", help="a folder with one sub-folder per label: FOLDER/<label>/<image>")
    src.add_argument("--medmnist", nargs="+", metavar="NPZ", help="MedMNIST .npz files; label = subset name")
    src.add_argument("--split", default="train", choices=["train", "val", "test"], help="MedMNIST split (default train)")
    src.add_argument("--shards", help="webdataset shards (folder, index.json, brace pattern) from csv_to_shards.py")
    parser.add_argument("--out", required=True, help="cache folder to write (created; rerun to resume)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="square side images are resized/cropped to, multiple of 16 (default: the tokenizer's "
                             "native size: 256 for the released weights, 128 for tiny)")
    parser.add_argument("--label-column", default="modality", help="CSV column used as the condition label (default modality)")
    parser.add_argument("--label-names-from", metavar="CACHE", default=None,
                        help="use the label list of an existing cache (e.g. the training cache when making the "
                             "validation cache); a label value not in it is an error")
    parser.add_argument("--flip", action="store_true", help="also store every image mirrored left-right (2 rows per image)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per tokenizer call (default 32)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="images per resumable chunk (default 1024)")
    parser.add_argument("--num-workers", type=int, default=2, help="image-reading worker processes (default 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    parser.add_argument("--no-bf16", action="store_true", help="on GPU, run the encoder in float32 instead of bf16 autocast")
    args = parser.parse_args(argv)
    sources = [x for x in (args.csv, args.folder, args.medmnist, args.shards) if x]
    if len(sources) != 1:
        parser.error("give exactly one of --csv, --folder, --medmnist, --shards")
    if bool(args.checkpoint) == bool(args.random_tokenizer):
        parser.error("give exactly one of --checkpoint SOURCE or --random-tokenizer PRESET")
    if args.img_size is not None and (args.img_size <= 0 or args.img_size % 16):
        parser.error(f"--img-size {args.img_size} is not a positive multiple of 16")
    return args


def load_tokenizer(args: argparse.Namespace, device: torch.device):
    """(tokenizer in eval mode, a source string that meditok.load_meditok can read back later).

    Raises meditok.CheckpointError when --checkpoint cannot be loaded (main reports it in one line, exit 2)."""
    if args.random_tokenizer:
        from pathlib import Path

        torch.manual_seed(0)
        model = meditok.build_meditok(args.random_tokenizer)
        saved = Path(args.out) / "tokenizer"
        if distributed.rank() == 0 and not (saved / "config.json").is_file():
            meditok.save_meditok(model, saved)
        distributed.barrier()
        model = meditok.load_meditok(saved)  # what a later `sample` will load, bit for bit
        return model.to(device).eval().requires_grad_(False), str(saved)
    model = meditok.load_meditok(args.checkpoint, device=device)
    return model.eval().requires_grad_(False), str(args.checkpoint)


def source_options(args: argparse.Namespace, img_size: int) -> Tuple[str, Dict[str, Any]]:
    """(kind, options) of the image source the flags name, for ``meditok.data.open_source``."""
    if args.csv:
        return "csv", {"csv_path": args.csv, "root": args.root, "img_size": img_size,
                       "label_column": args.label_column, "allow_outside_root": args.allow_outside_root}
    if args.folder:
        return "folder", {"folder": args.folder, "img_size": img_size, "allow_outside_root": args.allow_outside_root}
    if args.medmnist:
        return "medmnist", {"npz_files": args.medmnist, "split": args.split, "img_size": img_size}
    return "shards", {"shards": args.shards, "img_size": img_size}


def build_source(args: argparse.Namespace, img_size: int):
    """The :class:`meditok.data.ImageSource` of the flags, from the registry of ``meditok.data.sources``."""
    from meditok.data import open_source

    kind, options = source_options(args, img_size)
    return open_source(kind, **options)


def exit_status(error: BaseException) -> Optional[int]:
    """2 for bad input (a checkpoint, images or cache folder that cannot be used), 1 for a run that failed on
    the way (a write that the disk refused), None for anything else (a bug: its traceback is shown)."""
    from meditok.data import ImageSourceError, MedicalImageError

    if isinstance(error, (TokenCacheError, ImageSourceError, MedicalImageError, meditok.CheckpointError,
                          FileNotFoundError)):
        return 2
    if isinstance(error, OSError):
        return 1
    return None


def main(argv: Optional[List[str]] = None) -> int:
    """0 when the cache is written (or was already), 2 for bad input, 1 when the run failed on the way; an
    error is one line on stderr (see :func:`exit_status`)."""
    args = parse_args(argv)
    device = distributed.init_distributed(args.device)
    try:
        model, tokenizer_source = load_tokenizer(args, device)
        img_size = args.img_size or model.config.img_size
        source = build_source(args, img_size)
        label_names = TokenCache(args.label_names_from).label_names if args.label_names_from else None
        started = time.perf_counter()
        out = write_token_cache(
            model, source, args.out, img_size=img_size, batch_size=args.batch_size, chunk_size=args.chunk_size,
            flip=args.flip, label_names=label_names, num_workers=args.num_workers,
            amp_dtype=torch.bfloat16 if device.type == "cuda" and not args.no_bf16 else None,
            tokenizer_source=tokenizer_source, rank=distributed.rank(), world_size=distributed.world_size(),
            barrier=distributed.barrier)
        if distributed.rank() == 0:
            cache = TokenCache(out)
            seconds = time.perf_counter() - started
            print(f"wrote {out}: {len(cache)} rows of ids {tuple(cache.ids.shape[1:])} (grid {cache.grid}), labels "
                  f"{cache.manifest['counts_per_label']}, tokenizer {cache.fingerprint[:16]}; {seconds:.1f} s, "
                  f"{len(source) / max(seconds, 1e-9):.1f} images/s")
            if args.label_names_from:  # a validation / test split: does it hold every label of training?
                note = label_coverage_warning(TokenCache(args.label_names_from), cache)
                if note:
                    print(f"warning: {note}", file=sys.stderr)
    except Exception as error:  # these errors carry a one-line explanation that names the fix
        status = exit_status(error)
        if status is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        return status
    finally:
        distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
