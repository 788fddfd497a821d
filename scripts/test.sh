#!/usr/bin/env bash
# Set up .venv if needed, then run the whole test suite (CPU, offline, a few minutes).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/test_model.py -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
