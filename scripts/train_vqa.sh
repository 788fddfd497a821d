#!/usr/bin/env bash
# Medical VQA with MedITok as a language model's vision tower (paper Table 4): stage A (projector on image-caption
# pairs) → stage B (projector + LoRA on question-answer pairs) → evaluation with the Table 4 layout.
# No arguments: the CPU try-out (about 30 s on an idle 2-core machine) — a tiny random Llama-architecture LM
# (scripts/make_tiny_lm.py), the quick-start tokenizer runs/stage2_tiny/tokenizer if present (else a random tiny
# MedITok), the bundled examples (datasets/meta/examples_train.csv captions, datasets/meta/vqa_examples_*). See docs/vqa.md.
#
# Environment variables (all optional):
#   CONFIG          a configs/ name or path (default: vqa_tiny_cpu)
#   VISION_TOWER    MedITok weights (anything meditok.load_meditok reads, or random:tiny)
#   LANGUAGE_MODEL  folder of a transformers causal LM + tokenizer (default: the config's; the tiny one is made if missing)
#   OUT             run folder (default: runs/vqa_tiny); stages go to $OUT/stageA, $OUT/stageB, evaluation to $OUT/eval
#   EVAL_DATA       question file(s) for the evaluation (default: datasets/meta/vqa_examples_val.csv)
#   EVAL_ROOT       their image folder (default: datasets/examples for the default EVAL_DATA, else the release layout)
#   NPROC           processes (GPUs); > 1 launches torchrun (default 1)
#   PYTHON          interpreter (default: .venv/bin/python if present, else python3)
# Anything else on the command line goes to both training stages, e.g. --epochs 1.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # nothing is downloaded
# The tiny try-out model is faster on one thread; on a loaded 2-core machine two threads made a stage-B step
# ~20x slower (5 s vs 0.23 s). Set OMP_NUM_THREADS to change it (e.g. for a larger model on CPU).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
CONFIG=${CONFIG:-vqa_tiny_cpu}
case "$CONFIG" in */*|*.json) ;; *) CONFIG="configs/${CONFIG}.json" ;; esac
if [ ! -f "$CONFIG" ]; then
    echo "error: CONFIG=$CONFIG: no such file; name one of $(ls configs/vqa_*.json | xargs -n1 basename | sed 's/.json$//' | tr '\n' ' ')or give a path" >&2
    exit 2
fi
source scripts/stages.sh
RESUME_HINT="Run the same command again with --resume auto: each stage continues from its checkpoint (a finished one is not retrained)."
OUT=${OUT:-runs/vqa_tiny}
if [ -z "${VISION_TOWER:-}" ]; then
    if [ -d runs/stage2_tiny/tokenizer ]; then VISION_TOWER=runs/stage2_tiny/tokenizer; else VISION_TOWER=random:tiny; fi
fi
config_lm=$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1])).get('language_model', ''))" "$CONFIG")
LANGUAGE_MODEL=${LANGUAGE_MODEL:-$config_lm}
if [ ! -d "$LANGUAGE_MODEL" ]; then
    if [ "$LANGUAGE_MODEL" = "runs/vqa_tiny/lm" ]; then
        "$PYTHON" scripts/make_tiny_lm.py --out "$LANGUAGE_MODEL"
    else
        echo "error: LANGUAGE_MODEL=$LANGUAGE_MODEL is not a folder; point it at a saved transformers model" >&2; exit 2
    fi
fi
NPROC=${NPROC:-1}
launch=("$PYTHON" -m interpretation.train)
if [ "$NPROC" -gt 1 ]; then launch=("$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC" -m interpretation.train); fi
common=(--config "$CONFIG" --vision-tower "$VISION_TOWER" --language-model "$LANGUAGE_MODEL")

echo "[train_vqa] vision tower: $VISION_TOWER; language model: $LANGUAGE_MODEL; config: $CONFIG"
start=$(date +%s)
run_stage "stage A (projector)" "${launch[@]}" "${common[@]}" --stage A --out "$OUT/stageA" "$@"
t1=$(date +%s)
run_stage "stage B (projector + LoRA)" "${launch[@]}" "${common[@]}" --stage B --out "$OUT/stageB" --init-projector "$OUT/stageA" "$@"
t2=$(date +%s)
if [ -z "${EVAL_DATA:-}" ]; then EVAL_DATA=datasets/meta/vqa_examples_val.csv; EVAL_ROOT=${EVAL_ROOT:-datasets/examples}; fi
eval_flags=()
[ -n "${EVAL_ROOT:-}" ] && eval_flags+=(--image-root "$EVAL_ROOT")
# shellcheck disable=SC2086
run_stage "evaluation" "$PYTHON" -m evaluation.vqa --run "$OUT/stageB" --data $EVAL_DATA ${eval_flags[@]+"${eval_flags[@]}"} --max-new-tokens 8 --out "$OUT/eval"
t3=$(date +%s)
echo "[train_vqa] stage A $((t1 - start)) s, stage B $((t2 - t1)) s, evaluation $((t3 - t2)) s; total $((t3 - start)) s"
echo "[train_vqa] look at: $OUT/eval/vqa.md, $OUT/stageA/metrics.jsonl, $OUT/stageB/metrics.jsonl"
