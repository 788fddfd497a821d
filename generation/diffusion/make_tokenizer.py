"""Train a small WordPiece tokenizer on the captions of a CSV, for from-scratch diffusion models.

    python -m generation.diffusion.make_tokenizer --csv datasets/meta/examples_train.csv --out runs/caption_tokenizer

An LLM backbone brings its own tokenizer (use its folder); this is for the ``tiny``/``B`` presets when
no suitable vocabulary is at hand. Lower-cased; special tokens [PAD] [UNK] [CLS] [SEP] [MASK].
"""
from __future__ import annotations

import argparse
import csv
import sys
from typing import Optional, Sequence

from generation.text import load_text_tokenizer, train_caption_tokenizer


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m generation.diffusion.make_tokenizer",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--csv", nargs="+", required=True, help="CSV file(s) with a caption column")
    parser.add_argument("--column", default="caption", help="caption column name")
    parser.add_argument("--out", required=True, help="tokenizer folder to write")
    parser.add_argument("--vocab-size", type=int, default=1000, help="target vocabulary size (fewer if the text is small)")
    args = parser.parse_args(argv)
    captions = []
    for path in args.csv:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            if args.column not in (reader.fieldnames or []):
                print(f"error: {path} has no column {args.column!r} (columns: {reader.fieldnames}); pass --column",
                      file=sys.stderr)
                return 2
            captions += [row[args.column] for row in reader]
    out = train_caption_tokenizer(captions, args.out, vocab_size=args.vocab_size)
    print(f"[tokenizer] {len(load_text_tokenizer(out))} tokens from {len(captions)} captions → {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
