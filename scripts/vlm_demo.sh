#!/usr/bin/env bash
# bash scripts/vlm_demo.sh [vlm_demo flags, e.g. --tiny]   (docs/vlm.md)
# = source scripts/env.sh test && python -m megatron_dpsl.train.vlm_demo --out outputs/vlm "$@"
# Creates/reuses .venv (pinned CPU torch + megatron-core), then runs the VLM demonstration: procedural
# shape images, a tiny LLaVA trained in the paper's stages, upcycled to 2in4, 3 MoE runs on 2 ranks
# (aux loss, DPSL symmetric, DPSL modality priors), table + figure in outputs/vlm (docs/vlm.md).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
# shellcheck disable=SC1091
source scripts/env.sh test
set +u
out="outputs/vlm"
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
exec python -m megatron_dpsl.train.vlm_demo --out "$out" "${args[@]}"
