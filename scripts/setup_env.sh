#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv from requirements.txt, with the project
# itself installed in editable mode (so `python -m evaluation.x` and the scripts work from any directory).
# Idempotent: does nothing when .venv already matches requirements.txt and pyproject.toml.
#
# torch: on a machine without an NVIDIA driver (no working nvidia-smi and no /proc/driver/nvidia) torch and
# torchvision come from the CPU wheel index (https://download.pytorch.org/whl/cpu: a ~1 GB .venv instead of
# ~6 GB with the CUDA build pip's default index gives on x86_64 Linux), when that index can be reached within
# a few seconds; otherwise, with a driver, or on macOS, from pip's default index (and any mirror pip is
# configured with). One `[setup] torch: ...` line says which. `bash scripts/setup_env.sh --which-torch` prints
# that line and exits without touching the environment.
#
# Variables: PYTHON (interpreter to build the venv from, default python3), VENV (folder, default .venv),
# TORCH_INDEX (unset or `auto`: the choice above; `default`: pip's default index whatever the machine; a URL:
# that wheel index for torch/torchvision, e.g. https://download.pytorch.org/whl/cu126),
# TORCH_CPU_INDEX (the CPU index the automatic choice tries, default https://download.pytorch.org/whl/cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
PROBE_SECONDS=5

case "${1:-}" in
    "") ;;
    --which-torch) ;;
    *) echo "usage: bash scripts/setup_env.sh [--which-torch]   (got '$1'; settings are variables, see the" \
            "script's header)" >&2; exit 2 ;;
esac

has_nvidia_driver() {
    { command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L > /dev/null 2>&1; } || [ -e /proc/driver/nvidia ]
}

# Can the index be reached? Asked with Python's urllib rather than pip: pip would also consult the mirrors
# configured in pip.conf (extra-index-url, find-links) and so succeed when this index itself cannot be reached.
index_reachable() {
    "$PYTHON" - "$1" "$PROBE_SECONDS" <<'PY' 2>&1
import sys, urllib.request
url, timeout = sys.argv[1].rstrip("/") + "/torch/", float(sys.argv[2])
try:
    urllib.request.urlopen(url, timeout=timeout).close()
except Exception as error:  # DNS, refused, timeout, HTTP error: one line saying what
    print(f"{type(error).__name__}: {getattr(error, 'reason', error)}".replace("\n", " ")[:120])
    sys.exit(1)
PY
}

# Sets torch_index ("" = pip's default index) and prints one "[setup] torch: ..." line.
choose_torch_index() {
    local requested=${TORCH_INDEX:-auto} why
    torch_index=""
    if [ "$requested" = "default" ]; then
        echo "[setup] torch: pip's default index (TORCH_INDEX=default)"
    elif [ "$requested" != "auto" ]; then
        torch_index=$requested
        echo "[setup] torch: from $torch_index (TORCH_INDEX)"
    elif [ "$(uname -s)" = "Darwin" ]; then
        echo "[setup] torch: pip's default index (macOS wheels have no CUDA; TORCH_INDEX=URL to choose another)"
    elif has_nvidia_driver; then
        echo "[setup] torch: NVIDIA driver found: pip's default index, the CUDA build (TORCH_INDEX=$CPU_INDEX for" \
             "the CPU one)"
    elif why=$(index_reachable "$CPU_INDEX"); then
        torch_index=$CPU_INDEX
        echo "[setup] torch: no NVIDIA driver: the CPU build from $CPU_INDEX (TORCH_INDEX=default for pip's default" \
             "index)"
    else
        echo "[setup] torch: no NVIDIA driver, but $CPU_INDEX cannot be reached within ${PROBE_SECONDS} s ($why):" \
             "pip's default index and configured mirrors instead (TORCH_INDEX=URL to choose)"
    fi
}

if [ "${1:-}" = "--which-torch" ]; then
    choose_torch_index
    exit 0
fi

stamp="$VENV/.requirements.sha256"
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "[setup] $VENV is up to date"
    exit 0
fi
echo "[setup] creating $VENV with $($PYTHON --version) (a few minutes the first time)"
choose_torch_index
"$PYTHON" -m venv "$VENV"
log="$VENV/pip-install.log"
: > "$log"
if [ -n "$torch_index" ]; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "torch<=2.14.1" torchvision \
        --index-url "$torch_index" >> "$log" 2>&1 || {
        tail -30 "$log"
        echo "[setup] installing torch from $torch_index failed (log: $log); TORCH_INDEX=default takes pip's default" \
             "index" >&2
        exit 1
    }
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
