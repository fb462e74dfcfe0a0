#!/usr/bin/env bash
# Creates (or reuses) a venv in the repo and installs the project with a pinned CPU stack.
# Usage: source scripts/env.sh [extras] [stack]
#   extras  default: test
#   stack   cpu       (default) .venv           constraints-cpu.txt       megatron-core 0.16.1
#           mcore019            .venv-mcore019  constraints-mcore019.txt  megatron-core 0.19.2, the release GPU
#                     users install: it declares Python >= 3.12, but its cp311 wheel installs and imports on
#                     3.11 (--ignore-requires-python, for it alone: other packages keep their 3.11 releases);
#                     it imports triton, which installs on CPU too.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-test}"
stack="${2:-${DPSL_STACK:-cpu}}"
case "$stack" in
  cpu) venv="$repo/.venv" constraints="$repo/constraints-cpu.txt" ;;
  mcore019) venv="$repo/.venv-mcore019" constraints="$repo/constraints-mcore019.txt" ;;
  *) echo "scripts/env.sh: unknown stack '$stack' (cpu, mcore019)" >&2; return 2 2>/dev/null || exit 2 ;;
esac
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
stamp="$venv/.installed-$extras-$(cat "$repo/setup.py" "$constraints" | cksum | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
  # torch first, pinned: its CPU wheel lies on this machine's disk (an open-ended torch pulls CUDA)
  "$venv/bin/python" -m pip install -q -c "$constraints" torch 2>&1 | grep -v '^WARNING: Location' || true
  if [ "$stack" = mcore019 ]; then
    # its deps (torch, numpy, packaging) come with the project's below, resolved for this Python
    "$venv/bin/python" -m pip install -q --ignore-requires-python --no-deps -c "$constraints" megatron-core triton \
      2>&1 | grep -v '^WARNING: Location' || true
  fi
  "$venv/bin/python" -m pip install -q -c "$constraints" -e "$repo[$extras]" 2>&1 | grep -v '^WARNING: Location' || true
  "$venv/bin/python" -c "import torch, megatron.core, megatron_dpsl" >/dev/null
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
