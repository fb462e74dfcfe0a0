#!/usr/bin/env bash
# Installs (into .venv) and runs the default test suite: everything but `slow` and `gpu`.
# DPSL_STACK=mcore019 uses .venv-mcore019 (megatron-core 0.19.2) instead (scripts/env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh test "${DPSL_STACK:-cpu}"
python -m pytest -m "not slow and not gpu" "$@"
