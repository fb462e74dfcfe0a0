#!/usr/bin/env bash
# Creates (or reuses) .venv in the repo and installs the project with the pinned CPU stack.
# Usage: source scripts/env.sh [extras]   (extras default: test)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-test}"
py="${PYTHON:-python3}"
if [ ! -x "$repo/.venv/bin/python" ]; then
  "$py" -m venv "$repo/.venv"
fi
stamp="$repo/.venv/.installed-$extras-$(cat "$repo/setup.py" "$repo/constraints-cpu.txt" | cksum | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  "$repo/.venv/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
  # torch first, pinned: its CPU wheel lies on this machine's disk (an open-ended torch pulls CUDA)
  "$repo/.venv/bin/python" -m pip install -q -c "$repo/constraints-cpu.txt" torch 2>&1 | grep -v '^WARNING: Location' || true
  "$repo/.venv/bin/python" -m pip install -q -c "$repo/constraints-cpu.txt" -e "$repo[$extras]" 2>&1 | grep -v '^WARNING: Location' || true
  "$repo/.venv/bin/python" -c "import torch, megatron.core, megatron_dpsl" >/dev/null
  touch "$stamp"
fi
export PATH="$repo/.venv/bin:$PATH"
