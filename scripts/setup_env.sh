#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv from requirements.txt, with the project
# itself installed in editable mode (so `python -m evaluation.x` and the scripts work from any directory).
# Idempotent: does nothing when .venv already matches requirements.txt and pyproject.toml.
# Variables: PYTHON (interpreter to build the venv from, default python3), VENV (folder, default .venv),
# TORCH_INDEX (a wheel index for torch/torchvision, e.g. https://download.pytorch.org/whl/cpu for the CPU-only
# build: a ~1 GB .venv instead of ~6 GB with the default CUDA wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.requirements.sha256"
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "[setup] $VENV is up to date"
    exit 0
fi
echo "[setup] creating $VENV with $($PYTHON --version) (a few minutes the first time)"
"$PYTHON" -m venv "$VENV"
log="$VENV/pip-install.log"
if [ -n "${TORCH_INDEX:-}" ]; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "torch<=2.14.1" torchvision \
        --index-url "$TORCH_INDEX" > "$log" 2>&1 || { tail -30 "$log"; echo "[setup] torch from $TORCH_INDEX failed" >&2; exit 1; }
fi
if ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements.txt >> "$log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -30
    echo "[setup] pip install failed; full log: $log" >&2
    exit 1
fi
if ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e . \
        >> "$log" 2>&1; then
    tail -30 "$log"
    echo "[setup] installing the project (pip install -e .) failed; full log: $log" >&2
    exit 1
fi
echo "$want" > "$stamp"
echo "[setup] done: $("$VENV/bin/python" -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__)')"
