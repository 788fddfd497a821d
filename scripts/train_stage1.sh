#!/usr/bin/env bash
# Stage 1 (visual representation alignment). No arguments: the tiny CPU try-out on datasets/examples.
# Real run, e.g.:  NPROC=8 PRESET=large TRAIN_CSV=/data/meta.csv TRAIN_ROOT=/data bash scripts/train_stage1.sh
# See scripts/launch_training.sh for every variable; extra flags go to train.py (python train.py --help).
exec bash "$(dirname "$0")/launch_training.sh" 1 "$@"
