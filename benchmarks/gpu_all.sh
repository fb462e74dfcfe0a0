#!/usr/bin/env bash
# The GPU benchmark run of issues 7 and 12, in one go, writing the tables for docs/performance.md:
#   1. benchmarks/loss.py --device cuda: dpsl_loss forward+backward, bf16 probs, at B = 73,728 N = 16,
#      N = 64, B = 589,824 N = 16 and grouped + padded; torch path vs fused (Triton) path vs the fp32
#      torch.sort floor; events, per-call sync, host enqueue, kernels/call (goal: <= 0.25 ms and
#      <= 1.6x the floor at 73,728 x 16; within 2x elsewhere);
#   2. benchmarks/moe_layer.py: the MoE layer step at paper scale (hidden 2048, 16 experts of ffn 2048,
#      top-8, 4,608 x 16 tokens, bf16, alltoall, TE grouped GEMM when TE imports): TopKRouter + aux
#      loss vs DPSLRouter vs the SciPy-on-host DPSL (goal: DPSL adds <= 0.3 %, issue 12).
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
moe_quick=()
if [ "${QUICK:-0}" = 1 ]; then
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
failed=()
# CUDA: one command, the issue-12 shapes, torch path vs fused path vs the fp32 sort floor, prints markdown
# (< 90 s on an H100: 4 shapes x 3 measurements of ~80 calls each, plus Triton's first compilations)
if [ "$device" != cuda ]; then
  loss_args=(--device "$device" --quick --repeats 2) # CPU smoke: the SciPy comparison, plain text
elif [ "${QUICK:-0}" = 1 ]; then
  loss_args=(--device cuda --quick)
else
  loss_args=(--device cuda)
fi
{
  echo "#### dpsl_loss forward+backward"
  echo
  echo "Command: \`python benchmarks/loss.py ${loss_args[*]} ${LOSS_ARGS:-}\`"
  echo
  [ "$device" = cuda ] || echo '```'
} >>"$md"
# shellcheck disable=SC2086
"$py" benchmarks/loss.py "${loss_args[@]}" ${LOSS_ARGS:-} | tee -a "$md" ||
  failed+=(loss.py) # keep going: the layer benchmark is independent
{
  [ "$device" = cuda ] || echo '```'
  echo
} >>"$md"
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
