#!/usr/bin/env bash
# Joint image–report masked diffusion (docs/diffusion.md). No arguments: the tiny model on CPU on the bundled
# examples (datasets/examples + datasets/meta/examples_train.csv captions) in a few minutes:
#   1. MedITok ids of the examples → a token cache (python -m generation.tokenize_dataset)
#   2. a small caption tokenizer trained on the training captions (python -m generation.diffusion.make_tokenizer)
#   3. training with configs/diffusion_tiny_cpu.json (python -m generation.diffusion.train), resumable
# Variables: MEDITOK_CKPT (tokenizer weights; default runs/stage2_tiny/tokenizer from scripts/quickstart.sh if
# present, else a random tiny tokenizer — fine for a smoke run, meaningless images), CONFIG, RUN (run folder),
# NPROC (>1: torchrun, gloo on CPU / NCCL on GPU), PYTHON. Extra flags go to the trainer (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
CONFIG=${CONFIG:-configs/diffusion_tiny_cpu.json}
RUN=${RUN:-runs/diffusion_tiny}
CSV=${TRAIN_CSV:-datasets/meta/examples_train.csv}
ROOT=${TRAIN_ROOT:-datasets/examples}
NPROC=${NPROC:-1}
CACHE="$RUN/tokens/examples_train"
TEXT_TOKENIZER="$RUN/caption_tokenizer"

if [ -z "${MEDITOK_CKPT:-}" ] && [ -e runs/stage2_tiny/tokenizer ]; then MEDITOK_CKPT=runs/stage2_tiny/tokenizer; fi
if [ -n "${MEDITOK_CKPT:-}" ]; then TOKENIZER_ARGS=(--checkpoint "$MEDITOK_CKPT");
else
  echo "[train_diffusion] no MEDITOK_CKPT and no runs/stage2_tiny/tokenizer: using a random tiny MedITok (smoke run)"
  TOKENIZER_ARGS=(--random-tokenizer tiny)
fi

if [ ! -f "$CACHE/manifest.json" ]; then
  "$PYTHON" -m generation.tokenize_dataset "${TOKENIZER_ARGS[@]}" --csv "$CSV" --root "$ROOT" --out "$CACHE" --num-workers 0
fi
if [ ! -d "$TEXT_TOKENIZER" ]; then
  "$PYTHON" -m generation.diffusion.make_tokenizer --csv "$CSV" --out "$TEXT_TOKENIZER"
fi

ARGS=(--config "$CONFIG" --cache "$CACHE" --text-tokenizer "$TEXT_TOKENIZER" --out "$RUN" "$@")
if [ "$NPROC" -gt 1 ]; then
  exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m generation.diffusion.train "${ARGS[@]}"
fi
exec "$PYTHON" -m generation.diffusion.train "${ARGS[@]}"
