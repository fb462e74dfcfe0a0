#!/usr/bin/env bash
# The GPU benchmark run of issue 7, in one go, writing the table for docs/performance.md:
#   1. benchmarks/loss.py: dpsl_loss forward+backward at B = 73,728 and 589,824 tokens, N in {4, 16, 64},
#      bf16 input, vs the paper's SciPy-on-host baseline (goal: <= 0.3 ms at 73,728 x 16);
#   2. benchmarks/moe_layer.py: the MoE layer step at paper scale (hidden 2048, 16 experts of ffn 2048,
#      top-8, 4,608 x 16 tokens, bf16, alltoall, TE grouped GEMM when TE imports): TopKRouter + aux
#      loss vs DPSLRouter vs the SciPy-on-host DPSL (goal: DPSL adds <= 1 %).
#
# Usage (on the GPU machine; scripts/run_gpu_tests.sh calls it after its install stage):
#   bash benchmarks/gpu_all.sh [OUT_DIR]        # default outputs/gpu; writes OUT_DIR/performance_gpu.md
# Overrides: MOE_ARGS (extra benchmarks/moe_layer.py flags), LOSS_ARGS (extra benchmarks/loss.py flags),
# DEVICE (cuda), QUICK=1 (smoke run of this script: small shapes; with DEVICE=cpu it runs anywhere).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
out="${1:-$repo/outputs/gpu}"
mkdir -p "$out"
md="$out/performance_gpu.md"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
device="${DEVICE:-cuda}"
loss_grid=(--tokens 73728 589824 --experts 4 16 64)
moe_quick=()
if [ "${QUICK:-0}" = 1 ]; then
  loss_grid=(--tokens 8192 --experts 4 16 --repeats 2)
  moe_quick=(--quick)
fi

{
  echo "### ${device^^}: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
  echo
  echo "Measured $(date -u +%Y-%m-%d) at commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' + local changes');" \
    "$("$py" - <<'EOF'
import importlib.metadata as md, sys, torch
def v(d):
    try:
        return md.version(d)
    except md.PackageNotFoundError:
        return "not installed"
print(f"Python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"megatron-core {v('megatron-core')}, transformer-engine {v('transformer-engine')}.")
EOF
)"
  echo "Command: \`bash benchmarks/gpu_all.sh\` (via \`bash scripts/run_gpu_tests.sh\`)."
  echo
} >"$md"

t=$(date +%s)
echo "== dpsl_loss forward+backward (benchmarks/loss.py)"
loss_cmd="python benchmarks/loss.py --device $device --dtype bfloat16 ${loss_grid[*]} ${LOSS_ARGS:-}"
failed=()
# shellcheck disable=SC2086
"$py" benchmarks/loss.py --device "$device" --dtype bfloat16 "${loss_grid[@]}" ${LOSS_ARGS:-} | tee "$out/loss_gpu.txt" ||
  failed+=(loss.py) # keep going: the layer benchmark is independent
{
  echo "#### dpsl_loss forward+backward"
  echo
  echo "Command: \`$loss_cmd\`"
  echo
  # loss.py prints a plain table (B N ours baseline ratio peak): turn its rows into markdown
  "$py" - "$out/loss_gpu.txt" <<'PYEOF'
import re, sys
lines = open(sys.argv[1]).read().splitlines()
print(f"`{lines[0]}`" if lines else "")
print()
print("| B (tokens) | N (experts) | dpsl_loss ms | SciPy-on-host baseline ms | baseline / ours | peak MiB (ours) |")
print("|---:|---:|---:|---:|---:|---:|")
for line in lines:
    f = line.split()
    if len(f) == 6 and re.fullmatch(r"\d+", f[0]):
        print(f"| {int(f[0]):,} | {f[1]} | {f[2]} | {f[3]} | {f[4]}x | {f[5]} |")
PYEOF
  echo
} >>"$md"
rm -f "$out/loss_gpu.txt" # keep $OUT within the 8 files the device tool brings back
echo "   $(($(date +%s) - t)) s"

t=$(date +%s)
echo "== MoE layer step (benchmarks/moe_layer.py)"
# shellcheck disable=SC2086
"$py" benchmarks/moe_layer.py --device "$device" "${moe_quick[@]}" --markdown "$out/moe_layer_gpu.md" \
  --json "$out/moe_layer.json" ${MOE_ARGS:-} || failed+=(moe_layer.py)
{
  echo "#### MoE layer step"
  echo
  cat "$out/moe_layer_gpu.md" 2>/dev/null || echo "(benchmarks/moe_layer.py failed: see bench.log)"
} >>"$md"
rm -f "$out/moe_layer_gpu.md"
echo "   $(($(date +%s) - t)) s"
echo "== wrote $md"
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}" | tee -a "$md"
  exit 1
fi
