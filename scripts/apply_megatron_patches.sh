#!/usr/bin/env bash
# Apply megatron-dpsl's patches/ to a Megatron-LM checkout of a pinned tag (patches/<tag>/upstream.lock;
# the set is picked by the checkout's file hashes: core_v0.16.1 or core_v0.19.0).
#   bash scripts/apply_megatron_patches.sh /path/to/Megatron-LM           # apply (idempotent)
#   bash scripts/apply_megatron_patches.sh /path/to/Megatron-LM --check   # hashes + dry run only
# Fails, changing nothing, if the target files match no pinned release (naming each differing file).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
root="${1:-${MEGATRON_LM_PATH:?usage: $0 /path/to/Megatron-LM [--check] (or set MEGATRON_LM_PATH)}}"
shift || true
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python}" -m megatron_dpsl.megatron_lm.patching \
    --patches-dir "$here/patches" apply "$root" "$@"
