#!/usr/bin/env bash
# The whole try-out on a fresh machine, CPU only: about 3.5 minutes on an idle 2-core machine once .venv exists:
# environment → tiny random teacher/discriminator stand-ins → stage 1 → stage 2 → demo figures.
# Outputs: runs/stage1_tiny, runs/stage2_tiny (metrics.jsonl, vis/, loss_curves.png, tokenizer/), outputs/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup_env.sh
t1=$(date +%s)
if [ -d runs/stage1_tiny ] || [ -d runs/stage2_tiny ]; then
    echo "[quickstart] removing the previous quick-start runs (runs/stage1_tiny, runs/stage2_tiny)"
    rm -rf runs/stage1_tiny runs/stage2_tiny
fi
source scripts/stages.sh
RESUME_HINT="Continue it with bash scripts/train_stage1.sh --resume auto (or train_stage2.sh), then the later steps of this script by hand."
run_stage "stage 1" bash scripts/train_stage1.sh
t2=$(date +%s)
run_stage "stage 2" bash scripts/train_stage2.sh
t3=$(date +%s)
run_stage "the demo" .venv/bin/python demo.py --checkpoint runs/stage2_tiny/tokenizer --out outputs/demo
t4=$(date +%s)
echo "[quickstart] setup $((t1 - start)) s, stage 1 $((t2 - t1)) s, stage 2 $((t3 - t2)) s, demo $((t4 - t3)) s; total $((t4 - start)) s"
echo "[quickstart] look at: runs/stage1_tiny/loss_curves.png, runs/stage1_tiny/vis/, outputs/demo/summary.png"
