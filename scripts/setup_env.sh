#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv from requirements.txt.
# Idempotent: does nothing when .venv already matches requirements.txt.
# Variables: PYTHON (interpreter to build the venv from, default python3), VENV (folder, default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.requirements.sha256"
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "[setup] $VENV is up to date"
    exit 0
fi
echo "[setup] creating $VENV with $($PYTHON --version) (a few minutes the first time)"
"$PYTHON" -m venv "$VENV"
log="$VENV/pip-install.log"
if ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements.txt > "$log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -30
    echo "[setup] pip install failed; full log: $log" >&2
    exit 1
fi
echo "$want" > "$stamp"
echo "[setup] done: $("$VENV/bin/python" -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__)')"
