#!/usr/bin/env bash
# bash scripts/quickstart.sh [quickstart flags, e.g. --tiny]   (the README's first command)
# = source scripts/env.sh test && python -m megatron_dpsl.train.quickstart --out outputs/quickstart "$@"
# Creates/reuses .venv (pinned CPU torch + megatron-core), then runs the quickstart: corpus from this
# machine's text, dense GPT, upcycling, 3 MoE runs on 2 ranks, figures + table in outputs/quickstart.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
# shellcheck disable=SC1091
source scripts/env.sh test
set +u
out="outputs/quickstart"
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
exec python -m megatron_dpsl.train.quickstart --out "$out" "${args[@]}"
