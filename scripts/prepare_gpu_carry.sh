#!/usr/bin/env bash
# Fills .gpu_carry/ (git-ignored) with everything the one GPU command (scripts/run_gpu_tests.sh) needs
# that the GPU machine lacks. That machine has no network; a device call carries the work tree plus up
# to 8 ignored paths, 64 MiB in all, so this stays below 60 MiB and travels as one path: `.gpu_carry`.
#
#   MEGATRON_LM_GIT_DIR=/path/to/Megatron-LM(.git) bash scripts/prepare_gpu_carry.sh     # here, with PyPI
#
#   .gpu_carry/wheels/               cp312 wheels: megatron-core 0.19.2 (the release GPU users install;
#                                    tests/gpu and the benchmarks import it), pydantic 2.14.4 +
#                                    pydantic-core 2.50.5 + annotated-types + typing-inspection +
#                                    typing-extensions (Megatron-LM's megatron/training imports pydantic
#                                    through megatron.rl; the image has none)
#   .gpu_carry/trees/core_v0.16.1/   Megatron-LM trees exported from $MEGATRON_LM_GIT_DIR (megatron/,
#   .gpu_carry/trees/core_v0.19.0/   pretrain_gpt.py, gpt_builders.py, model_provider.py), each with the
#                                    dataset helpers (megatron/core/datasets/helpers_cpp.cpython-312-*.so)
#                                    copied from the megatron-core cp312 wheel of the same release
#                                    (0.16.1; 0.19.2), so nothing compiles on the GPU machine
#   .gpu_carry/MANIFEST              what is there, with sizes and the tags' commits
#
# Not carried (the image has them, docs/gpu.md): torch, triton, numpy, six, psutil, packaging, tqdm,
# pyyaml, tensorboard. Overrides: PYTHON (a python with pip), DPSL_CARRY (.gpu_carry).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
carry="${DPSL_CARRY:-$repo/.gpu_carry}"
py="${PYTHON:-$([ -x "$repo/.venv/bin/python" ] && echo "$repo/.venv/bin/python" || echo python3)}"
: "${MEGATRON_LM_GIT_DIR:?set MEGATRON_LM_GIT_DIR to a local clone or mirror of https://github.com/NVIDIA/Megatron-LM}"
LIMIT_MIB=60
# Megatron-LM tag -> the megatron-core release whose cp312 wheel supplies its dataset helpers
declare -A CORE=([core_v0.16.1]=0.16.1 [core_v0.19.0]=0.19.2)
WHEELS=(megatron-core==0.19.2 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5 typing-extensions==4.16.0)
plat=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

rm -rf "$carry"
mkdir -p "$carry/wheels" "$carry/trees"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "== cp312 wheels -> $carry/wheels"
"$py" -m pip download -q "${plat[@]}" -d "$carry/wheels" "${WHEELS[@]}" 2>&1 | grep -v '^WARNING: Location' || true
for w in "${WHEELS[@]}"; do
  name="${w%%==*}"
  ls "$carry/wheels/${name//-/_}-${w##*==}-"*.whl >/dev/null || { echo "missing wheel: $w" >&2; exit 1; }
done

for tag in "${!CORE[@]}"; do
  version="${CORE[$tag]}"
  tree="$carry/trees/$tag"
  echo "== $tag -> $tree (dataset helpers from megatron-core $version cp312)"
  "$py" "$repo/tests/support/megatron_lm_tree.py" export "$tag" "$tree" >/dev/null
  wheel=$(ls "$carry/wheels/megatron_core-$version-"*.whl 2>/dev/null || true)
  if [ -z "$wheel" ]; then
    "$py" -m pip download -q "${plat[@]}" -d "$tmp" "megatron-core==$version" 2>&1 | grep -v '^WARNING: Location' || true
    wheel=$(ls "$tmp/megatron_core-$version-"*.whl)
  fi
  so=$(unzip -Z1 "$wheel" | grep -E '^megatron/core/datasets/helpers_cpp\.cpython-312-[^/]*\.so$')
  unzip -q -o -j "$wheel" "$so" -d "$tree/megatron/core/datasets/"
  # newer than helpers.cpp, so Megatron's `make -C megatron/core/datasets` finds nothing to do
  touch "$tree/megatron/core/datasets/$(basename "$so")"
done

{
  echo "# .gpu_carry, made by scripts/prepare_gpu_carry.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  for tag in "${!CORE[@]}"; do
    echo "tree $tag $(git --git-dir "$MEGATRON_LM_GIT_DIR" rev-parse "$tag^{commit}") helpers from megatron-core ${CORE[$tag]}"
  done
  (cd "$carry" && find . -type f ! -path './trees/*' ! -name MANIFEST -printf '%s %p\n' | sort -k2)
  (cd "$carry" && du -sb trees/* | awk '{print $1, $2}')
} >"$carry/MANIFEST"

total=$(du -sb "$carry" | cut -f1)
mib=$(awk "BEGIN {printf \"%.1f\", $total / 1048576}")
echo "== $carry: $mib MiB (limit $LIMIT_MIB MiB)"
cat "$carry/MANIFEST"
if [ "$total" -ge $((LIMIT_MIB * 1048576)) ]; then
  echo "too large: a device call carries 64 MiB with the work tree" >&2
  exit 1
fi
