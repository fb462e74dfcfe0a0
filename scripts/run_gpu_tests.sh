#!/usr/bin/env bash
# The one GPU command: the whole user story on one GPU (issue 11), within one device call.
#
#   here:    MEGATRON_LM_GIT_DIR=/path/to/Megatron-LM bash scripts/prepare_gpu_carry.sh   # .gpu_carry, ~27 MiB
#   device:  run  command "bash scripts/run_gpu_tests.sh"  carry [".gpu_carry"]  timeout_s 540
#   here:    bash scripts/run_gpu_tests.sh --dry-run      # the plan: each stage's command and limit, syntax checks
#
# Stages, each under its own time limit (the total budget DPSL_BUDGET_S, 480 s, leaves the device call
# room for the machine's start); summary.md gets pass/fail and seconds per stage:
#   preflight  the GPU, the carried files, Python; shims for `make`/`python3-config` only where the
#              image lacks them (Megatron-LM runs `make -C megatron/core/datasets`, which finds the
#              carried helpers .so up to date)
#   install    pip --no-index --no-deps: .gpu_carry/wheels (megatron-core 0.19.2, pydantic, ...) and this
#              checkout into $DPSL_PREFIX; no Transformer Engine (the TE/FP8 tests skip, saying so)
#   story      scripts/megatron_lm_story.py for core_v0.16.1 and core_v0.19.0 side by side (own work dirs
#              and ports): dense run, patched tree and unpatched launcher -> megatron-dpsl upcycle ->
#              DPSL MoE run loading it -> save -> resume -> group priors on the patched tree
#   bench      benchmarks/gpu_all.sh, alone on the GPU (it times things), before the story so that a
#              slow story cannot cut the measurements
#   tests      pytest -m gpu tests/gpu (alongside the story: neither times anything)
#   vlm        opt-in (DPSL_STAGES=preflight,install,vlm): scripts/megatron_lm_vlm_story.py, an MoE
#              LLaVA at the paper's shapes through the VLM launcher, aux_loss vs DPSL (modality
#              priors), for DPSL_VLM_TAGS (default core_v0.19.0); vlm_<tag>.md
# Outputs ($OUT on the device, else outputs/gpu): summary.md, install.log, gpu_tests.log, bench.log,
# performance_gpu.md, moe_layer.json, story_<tag>.md and story/<tag>_<stage>.log.
#
# Overrides: DPSL_STAGES (preflight,install,story,tests,bench), DPSL_BUDGET_S (480), DPSL_CARRY (.gpu_carry),
# DPSL_PREFIX (/tmp/dpsl-prefix), DPSL_WORK (/tmp/dpsl-story), PYTEST_ARGS, PYTHON (python3: the image's,
# /opt/torch/.venv/bin/python3 with torch 2.11+cu130), QUICK=1 (benchmarks' smoke shapes).
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
dry=0
[ "${1:-}" = "--dry-run" ] && dry=1
out="${OUT:-$repo/outputs/gpu}"
carry="${DPSL_CARRY:-$repo/.gpu_carry}"
prefix="${DPSL_PREFIX:-/tmp/dpsl-prefix}"
work="${DPSL_WORK:-/tmp/dpsl-story}"
py="${PYTHON:-python3}"
stages=",${DPSL_STAGES:-preflight,install,story,tests,bench},"
budget="${DPSL_BUDGET_S:-480}"
TAGS=(core_v0.16.1 core_v0.19.0)
# per-stage limits (s); story and tests run side by side, so they share one slot of the budget
LIMIT_PREFLIGHT=30 LIMIT_INSTALL=60 LIMIT_BENCH=150 LIMIT_STORY=300 LIMIT_TESTS=240 LIMIT_VLM=320
# bytecode is written: the first Megatron-LM process of a tree compiles it, the next ones reuse it
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"

if [ "$dry" = 1 ]; then
  echo "# dry run: nothing is installed or started"
  fail=0
  for f in scripts/run_gpu_tests.sh scripts/prepare_gpu_carry.sh benchmarks/gpu_all.sh; do
    bash -n "$f" && echo "syntax ok  $f" || { echo "SYNTAX     $f"; fail=1; }
  done
  "$py" -m py_compile scripts/megatron_lm_story.py && echo "compiles   scripts/megatron_lm_story.py" || fail=1
  if [ -f "$carry/MANIFEST" ]; then
    echo "carry      $carry: $(du -sm "$carry" | cut -f1) MiB"
    for tag in "${TAGS[@]}"; do
      ls "$carry/trees/$tag/megatron/core/datasets/"helpers_cpp.cpython-312-*.so >/dev/null 2>&1 &&
        echo "tree       $tag (helpers .so present)" || { echo "MISSING    $carry/trees/$tag (or its helpers .so)"; fail=1; }
    done
  else
    echo "MISSING    $carry: run scripts/prepare_gpu_carry.sh first"
    fail=1
  fi
  echo "stages     ${stages//,/ } (budget $budget s)"
  echo "preflight  limit $LIMIT_PREFLIGHT s; install limit $LIMIT_INSTALL s: pip --no-index --no-deps --prefix $prefix $carry/wheels/*.whl ."
  echo "story      limit $LIMIT_STORY s per tag, both tags at once; tests limit $LIMIT_TESTS s alongside:"
  echo "           $py -m pytest -m gpu tests/gpu -q -rs ${PYTEST_ARGS:-}"
  for tag in "${TAGS[@]}"; do
    "$py" scripts/megatron_lm_story.py show --tag "$tag" --work "$work/$tag" --tree "$carry/trees/$tag" | sed 's/^/           /'
  done
  echo "bench      limit $LIMIT_BENCH s, before the story: bash benchmarks/gpu_all.sh $out"
  echo "vlm        (opt-in: DPSL_STAGES=preflight,install,vlm) limit $LIMIT_VLM s per tag in DPSL_VLM_TAGS:"
  "$py" -m py_compile scripts/megatron_lm_vlm_story.py && echo "compiles   scripts/megatron_lm_vlm_story.py" || fail=1
  "$py" scripts/megatron_lm_vlm_story.py show --tag core_v0.19.0 --work "$work/vlm-core_v0.19.0" \
    --tree "$carry/trees/core_v0.19.0" | sed 's/^/           /'
  exit $fail
fi

mkdir -p "$out" "$out/story"
t0=$(date +%s)
summary="$out/summary.md"
left() { echo $((budget - ($(date +%s) - t0))); }
note() { echo "$*" | tee -a "$summary"; }
row() { note "| $1 | $2 | $3 | $4 | $5 |"; }  # stage, result, seconds, limit, notes
# lim WANTED: WANTED, cut to what is left of the budget (at least 20 s)
lim() { local l; l=$(left); [ "$1" -lt "$l" ] && l=$1; [ "$l" -lt 20 ] && l=20; echo "$l"; }

: >"$summary"
note "# GPU run $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
note ""
note "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' + local changes'); $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
note ""
note "| stage | result | s | limit s | notes |"
note "|---|---|---:|---:|---|"

if [[ $stages == *,preflight,* ]]; then
  s=$(date +%s)
  shims="$work/bin"
  mkdir -p "$shims"
  msgs=()
  # Megatron-LM's compile_helpers runs `make -C megatron/core/datasets`; its Makefile names the .so with
  # `python3-config --extension-suffix`. With both present, make finds the carried .so newer than
  # helpers.cpp and does nothing; a missing python3-config, or one of another Python, is shadowed by a
  # shim that answers for this Python.
  want_suffix=$("$py" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
  if [ "$(python3-config --extension-suffix 2>/dev/null)" != "$want_suffix" ]; then
    printf '#!/bin/sh\nexec %s -c "import sysconfig; print(sysconfig.get_config_var(\\"EXT_SUFFIX\\"))"\n' "$py" >"$shims/python3-config"
    chmod +x "$shims/python3-config"
    msgs+=("python3-config shim")
  fi
  if ! command -v make >/dev/null; then
    printf '#!/bin/sh\n# no make on this image: the carried helpers .so stands for the build\nls "$2"/helpers_cpp*.so >/dev/null\n' >"$shims/make"
    chmod +x "$shims/make"
    msgs+=("make shim")
  fi
  export PATH="$shims:$PATH"
  ok=pass
  for tag in "${TAGS[@]}"; do
    d="$carry/trees/$tag/megatron/core/datasets"
    if ! ls "$d"/helpers_cpp.cpython-312-*.so >/dev/null 2>&1; then
      ok=FAIL
      msgs+=("$tag: no helpers .so (run scripts/prepare_gpu_carry.sh)")
    elif make -q -C "$d" >/dev/null 2>&1; then
      msgs+=("$tag helpers up to date")
    else
      msgs+=("$tag: make -q says the helpers would rebuild")
    fi
  done
  "$py" -c 'import sys, torch; assert torch.cuda.is_available(); print(sys.version.split()[0], "torch", torch.__version__, torch.cuda.get_device_name())' \
    >"$out/preflight.log" 2>&1 || ok=FAIL
  msgs+=("$(tail -1 "$out/preflight.log")")
  row preflight "$ok" $(($(date +%s) - s)) "$LIMIT_PREFLIGHT" "$(IFS=';'; echo "${msgs[*]}")"
fi

if [[ $stages == *,install,* ]]; then
  s=$(date +%s)
  rm -rf "$prefix"
  # --ignore-requires-python: megatron-core 0.19.2 says >= 3.12; a no-op on the device's 3.12, it lets
  # a dress rehearsal of this script run on 3.11 with cp311 wheels
  pip_in() { "$py" -m pip install -q --no-index --no-deps --no-build-isolation --ignore-installed \
    --ignore-requires-python --no-warn-script-location --prefix "$prefix" "$@"; }
  (
    set -e
    pip_in "$carry"/wheels/*.whl
    pip_in "$repo"
  ) >"$out/install.log" 2>&1 &
  pid=$!
  ( sleep "$(lim $LIMIT_INSTALL)"; kill "$pid" 2>/dev/null ) &
  watchdog=$!
  wait "$pid"
  rc=$?
  kill "$watchdog" 2>/dev/null
  site=$(find "$prefix" -maxdepth 5 -type d \( -name site-packages -o -name dist-packages \) 2>/dev/null | paste -sd:)
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$prefix/bin:$PATH"
  versions=$("$py" -c 'import importlib.metadata as m; print(", ".join(f"{d} {m.version(d)}" for d in ("megatron-core", "pydantic", "megatron-dpsl")))' 2>>"$out/install.log")
  [ "$rc" = 0 ] && [ -n "$versions" ] && r=pass || r=FAIL
  row install "$r" $(($(date +%s) - s)) "$LIMIT_INSTALL" "rc=$rc; $versions"
fi

if [[ $stages != *,install,* ]] && [ -f "$prefix/env.sh" ]; then
  # an install made by scripts/install_gpu.sh (the Transformer Engine route, docs/gpu.md)
  # shellcheck disable=SC1091
  source "$prefix/env.sh"
fi

if [[ $stages == *,bench,* ]]; then
  # first, alone on the GPU (it times things) and before the story, so that a slow story cannot cut it
  s=$(date +%s)
  l=$(lim $LIMIT_BENCH)
  timeout "$l" bash benchmarks/gpu_all.sh "$out" >"$out/bench.log" 2>&1
  rc=$?
  [ "$rc" = 0 ] && r=pass || r=FAIL
  [ "$rc" = 124 ] && r="FAIL (time limit)"
  row bench "$r" $(($(date +%s) - s)) "$l" "table performance_gpu.md"
fi

story_pids=() tests_pid=""
if [[ $stages == *,story,* ]]; then
  s_story=$(date +%s)
  port=29500
  for tag in "${TAGS[@]}"; do
    timeout "$(lim $LIMIT_STORY)" "$py" scripts/megatron_lm_story.py run --tag "$tag" --tree "$carry/trees/$tag" \
      --work "$work/$tag" --out "$out" --port "$port" >"$out/story/$tag.log" 2>&1 &
    story_pids+=("$tag:$!")
    port=$((port + 100))
  done
fi
if [[ $stages == *,vlm,* ]]; then
  # opt-in (DPSL_STAGES=preflight,install,vlm): two paper-shape LLaVA runs per tag, one tag at a time
  # (~55 GB of weights and Adam state each), too long to share a device call with the story;
  # DPSL_VLM_TAGS (default core_v0.19.0, what GPU users install) picks the tags
  for tag in ${DPSL_VLM_TAGS:-core_v0.19.0}; do
    s=$(date +%s)
    l=$(lim $LIMIT_VLM)
    timeout "$l" "$py" scripts/megatron_lm_vlm_story.py run --tag "$tag" --tree "$carry/trees/$tag" \
      --work "$work/vlm-$tag" --out "$out" >"$out/story/vlm_$tag.log" 2>&1
    rc=$?
    [ "$rc" = 0 ] && r=pass || r=FAIL
    [ "$rc" = 124 ] && r="FAIL (time limit)"
    row "vlm $tag" "$r" $(($(date +%s) - s)) "$l" "vlm_$tag.md; logs story/"
  done
fi
if [[ $stages == *,tests,* ]]; then
  s_tests=$(date +%s)
  # shellcheck disable=SC2086
  timeout "$(lim $LIMIT_TESTS)" "$py" -m pytest -m gpu tests/gpu -q -rs -p no:cacheprovider \
    --junitxml="$out/gpu_tests.xml" ${PYTEST_ARGS:-} >"$out/gpu_tests.log" 2>&1 &
  tests_pid=$!
fi
for entry in "${story_pids[@]}"; do
  tag=${entry%%:*}
  wait "${entry##*:}"
  rc=$?
  [ "$rc" = 0 ] && r=pass || r=FAIL
  [ "$rc" = 124 ] && r="FAIL (time limit)"
  row "story $tag" "$r" $(($(date +%s) - s_story)) "$LIMIT_STORY" "stages in story_$tag.md; logs story/"
done
if [ -n "$tests_pid" ]; then
  wait "$tests_pid"
  rc=$?
  [ "$rc" = 0 ] && r=pass || r=FAIL
  [ "$rc" = 124 ] && r="FAIL (time limit)"
  row tests "$r" $(($(date +%s) - s_tests)) "$LIMIT_TESTS" \
    "$(grep -E '[0-9]+ (passed|failed|skipped|errors?)' "$out/gpu_tests.log" | tail -1)"
fi

note ""
note "total $(($(date +%s) - t0)) s (budget $budget s)"
for tag in "${TAGS[@]}"; do
  [ -f "$out/story_$tag.md" ] && { echo; cat "$out/story_$tag.md"; } | tee -a "$summary"
  [ -f "$out/vlm_$tag.md" ] && { echo; cat "$out/vlm_$tag.md"; } | tee -a "$summary"
done
echo
[ -f "$out/performance_gpu.md" ] && cat "$out/performance_gpu.md"
echo
cat "$summary"
! grep -q "| FAIL" "$summary"
