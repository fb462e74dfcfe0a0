#!/usr/bin/env bash
# Installs (into .venv) and runs the default test suite: everything but `slow` and `gpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh test
python -m pytest -m "not slow and not gpu" "$@"
