#!/usr/bin/env bash
# Stage 2 (textual semantic alignment), continuing from stage 1's run folder (INIT_FROM to change it,
# e.g. INIT_FROM=weights/meditok_simple_v1.pth to start from the released weights).
# No arguments: the tiny CPU try-out continuing runs/stage1_tiny. See scripts/launch_training.sh.
exec bash "$(dirname "$0")/launch_training.sh" 2 "$@"
