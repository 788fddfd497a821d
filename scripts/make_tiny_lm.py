"""Write a tiny randomly initialised Llama-architecture language model + tokenizer for the interpretation tests
and the CPU try-out (scripts/train_vqa.sh).

    python scripts/make_tiny_lm.py                       # → runs/vqa_tiny/lm
    python scripts/make_tiny_lm.py --out /tmp/lm --no-chat-template

The tokenizer is a byte-level BPE trained on a small built-in corpus plus the captions and questions of the bundled
examples (datasets/meta/examples_*.csv, datasets/meta/vqa_examples_*); the model is a 2-layer LlamaForCausalLM of
width 64 with random weights (≈ 0.14 M parameters; a second or so). Not pretrained: its answers mean nothing. Load
it as any model: AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out).
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from interpretation.tiny import MISTRAL_STYLE_CHAT_TEMPLATE, make_tiny_lm

ROOT = Path(__file__).resolve().parents[1]


def example_text() -> list:
    """Captions and questions/answers of the bundled examples (so the tiny vocabulary covers them)."""
    texts = []
    for path in sorted((ROOT / "datasets" / "meta").glob("*.csv")):
        with open(path, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                texts.extend(row.get(k, "") for k in ("caption", "question", "answer"))
    return [t for t in texts if t]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="runs/vqa_tiny/lm", help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--hidden-size", type=int, default=64, help="model width")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers")
    parser.add_argument("--no-chat-template", action="store_true",
                        help="a tokenizer without a chat template (the plain USER:/ASSISTANT: template is used then)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = make_tiny_lm(args.out, seed=args.seed, hidden_size=args.hidden_size, num_layers=args.layers,
                       extra_text=example_text(),
                       chat_template=None if args.no_chat_template else MISTRAL_STYLE_CHAT_TEMPLATE)
    print(f"tiny language model → {out} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
