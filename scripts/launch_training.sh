#!/usr/bin/env bash
# Shared launcher behind train_stage1.sh / train_stage2.sh. Usage: launch_training.sh STAGE [train.py flags...]
#
# Environment variables (all optional):
#   PRESET        tiny (default: CPU try-out config) | small | base | large (GPU config)
#   CONFIG        a configs/ name or path (default: stage{N}_tiny_cpu for tiny, stage{N}_large_h100 otherwise)
#   TRAIN_CSV, TRAIN_ROOT, TRAIN_SHARDS, OUTPUT_DIR, INIT_FROM   override the config's data/output/init
#   NPROC         processes per node (GPUs); > 1 launches torchrun (default 1)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node torchrun rendezvous (defaults: 1, 0, 127.0.0.1, 29500)
#   PYTHON        interpreter (default: .venv/bin/python if present, else python3)
# Anything after STAGE is passed to train.py and wins over the config, e.g. --max-steps 20 --batch-size 4.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:?usage: launch_training.sh STAGE [train.py flags...]}; shift
PRESET=${PRESET:-tiny}
if [ "$PRESET" = "tiny" ]; then CONFIG=${CONFIG:-stage${STAGE}_tiny_cpu}; else CONFIG=${CONFIG:-stage${STAGE}_large_h100}; fi
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

flags=(--config "$CONFIG")
[ "$PRESET" != "tiny" ] && flags+=(--preset "$PRESET")
[ -n "${TRAIN_CSV:-}" ] && flags+=(--train-csv "$TRAIN_CSV")
[ -n "${TRAIN_ROOT:-}" ] && flags+=(--train-root "$TRAIN_ROOT")
[ -n "${TRAIN_SHARDS:-}" ] && flags+=(--train-shards "$TRAIN_SHARDS")
[ -n "${OUTPUT_DIR:-}" ] && flags+=(--output-dir "$OUTPUT_DIR")
[ -n "${INIT_FROM:-}" ] && flags+=(--init-from "$INIT_FROM")

# Stage 2 continues a stage-1 run: say so before any model is built when it is not there yet.
init=${INIT_FROM:-$(sed -n 's/.*"init_from": *"\([^"]*\)".*/\1/p' "configs/${CONFIG%.json}.json" 2>/dev/null)}
if [ "$STAGE" = "2" ] && [ -n "$init" ] && [[ "$init" != hf-hub:* ]] && [ ! -e "$init" ]; then
    echo "stage 2 starts from $init, which does not exist yet: run stage 1 first (bash scripts/train_stage1.sh)," \
         "or set INIT_FROM to stage-1 weights (e.g. weights/meditok_simple_v1.pth)" >&2
    exit 2
fi

# The CPU try-out uses tiny random stand-ins for BiomedCLIP and DINO: make them once (seconds).
if grep -q '"external/tiny/' "configs/${CONFIG%.json}.json" 2>/dev/null && [ ! -d external/tiny/biomedclip ]; then
    "$PYTHON" scripts/make_tiny_networks.py --out external/tiny
fi

NPROC=${NPROC:-1}; NNODES=${NNODES:-1}
if [ "$NPROC" -gt 1 ] || [ "$NNODES" -gt 1 ]; then
    # torchrun kills its ranks this long after forwarding a SIGTERM: time to finish the step, agree and save
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}
    exec "$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC" --nnodes "$NNODES" \
        --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
        train.py "${flags[@]}" "$@"
fi
exec "$PYTHON" train.py "${flags[@]}" "$@"
