#!/usr/bin/env bash
# Installs megatron-dpsl with its `te` extra on a CUDA machine without network access
# (the device machine: Python 3.12, torch 2.11.0+cu130, nvcc 13.0, no package index), from wheels
# carried in .whl/. Every step is timed; versions are printed at the end.
#
#   here, with PyPI:   bash scripts/install_gpu.sh --download   # fills .whl/ (pip download + split)
#   device:            bash scripts/install_gpu.sh --stage      # stash carried TE-core parts (repeat)
#   device:            bash scripts/install_gpu.sh              # install into $DPSL_PREFIX
#   then:              source "$DPSL_PREFIX/env.sh"             # PYTHONPATH for the installed stack
#
# What gets installed (pinned; see docs/gpu.md for why each):
#   megatron-core 0.19.2             newest release for Python 3.12 / torch>=2.6 (cp312 wheel)
#   transformer-engine 2.20.2        = transformer_engine (python) + transformer_engine_cu13 (the
#                                      prebuilt core library, 276 MB) + transformer_engine_torch,
#                                      which PyPI ships only as an sdist: built here against the
#                                      machine's torch (33 C++ files, no .cu; UNMEASURED, est. 3-6 min)
#   pydantic (+ core, annotated-types, typing-inspection, typing-extensions), nvdlfw-inspect:
#                                      TE's import-time needs the device image lacks
#   megatron-dpsl                    this checkout (--no-deps: torch, numpy, scipy are in the image)
#
# The TE core wheel (276 MB) is larger than what one device call can carry (64 MiB), so --download
# splits it into .whl/te-core/part-NN (48 MiB each) and each device call carries one part; --stage
# stashes the carried parts in $DPSL_TE_STAGE until all are there (docs/gpu.md lists the calls).
# The device keeps a machine warm for only ~30 s after a call: issue the staging calls back to back.
#
# Environment overrides: DPSL_PREFIX (/tmp/dpsl-prefix), DPSL_TE (auto|1|0; auto = install TE when
# every core part is staged), DPSL_TE_STAGE (/var/tmp/dpsl-te-core), DPSL_MCORE_VERSION (0.19.2, or
# the carried 0.16.1), DPSL_WHL (.whl), NVTE_CUDA_ARCHS (from the GPU), MAX_JOBS (nproc), PYTHON (python3).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
whl="${DPSL_WHL:-$repo/.whl}"
MCORE_VERSION="${DPSL_MCORE_VERSION:-0.19.2}" # 0.16.1 (the CPU pin) is carried too, as a fallback
TE_VERSION=2.20.2
TE_CUDA=cu13 # the device's torch is +cu130
PART_MIB=48
py="${PYTHON:-python3}"
prefix="${DPSL_PREFIX:-/tmp/dpsl-prefix}"
stage="${DPSL_TE_STAGE:-/var/tmp/dpsl-te-core}"

step_t0=0
step() { step_t0=$(date +%s%N); echo "== [$(date -u +%H:%M:%S)] $*"; }
done_step() { local ms=$((($(date +%s%N) - step_t0) / 1000000)); printf '   done in %d.%01d s\n' $((ms / 1000)) $((ms % 1000 / 100)); }

download() {
  # Run on a machine with PyPI (this one). Fetches exactly the wheels listed above.
  local plat=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  mkdir -p "$whl/base" "$whl/te-core"
  step "pip download: megatron-core, TE python + runtime deps -> .whl/base"
  "$py" -m pip download -q "${plat[@]}" -d "$whl/base" \
    "megatron-core==$MCORE_VERSION" "transformer-engine==$TE_VERSION" \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing-extensions==4.16.0 nvdlfw-inspect==0.2.2
  "$py" -m pip download -q "${plat[@]}" -d "$whl/base" megatron-core==0.16.1
  done_step
  step "transformer_engine_torch sdist (PyPI has no wheel; pip download would try to build it)"
  local url
  url=$(curl -fsS "https://pypi.org/simple/transformer-engine-torch/" |
    grep -o "https://files.pythonhosted.org/[^\"#]*transformer_engine_torch-$TE_VERSION.tar.gz" | head -1)
  curl -fsS -o "$whl/base/transformer_engine_torch-$TE_VERSION.tar.gz" "$url"
  done_step
  step "transformer-engine-$TE_CUDA core wheel -> .whl/te-core/part-NN ($PART_MIB MiB each)"
  local tmp
  tmp=$(mktemp -d)
  "$py" -m pip download -q "${plat[@]}" -d "$tmp" "transformer-engine-$TE_CUDA==$TE_VERSION"
  local core
  core=$(ls "$tmp"/transformer_engine_"$TE_CUDA"-*.whl)
  rm -f "$whl/te-core"/part-*
  split -b "${PART_MIB}M" -d -a 2 "$core" "$whl/te-core/part-"
  (cd "$tmp" && sha256sum "$(basename "$core")") >"$whl/base/te-core.sha256"
  ls "$whl/te-core" >"$whl/base/te-core.parts"
  rm -rf "$tmp"
  done_step
  du -sh "$whl/base" "$whl/te-core"/part-*
  echo "carry .whl/base in every device call; each te-core part in its own call (see docs/gpu.md)"
}

stage_parts() {
  # Device: keep carried TE-core parts outside the work tree until all have arrived.
  mkdir -p "$stage"
  if [ -d "$whl/te-core" ]; then
    for p in "$whl/te-core"/part-*; do [ -f "$p" ] && cp -f "$p" "$stage/"; done
  fi
  local missing=0
  if [ -f "$whl/base/te-core.parts" ]; then
    while read -r p; do
      if [ -f "$stage/$p" ]; then echo "staged  $p"; else echo "MISSING $p"; missing=1; fi
    done <"$whl/base/te-core.parts"
  else
    echo "no .whl/base/te-core.parts: carry .whl/base too"
    missing=1
  fi
  return $missing
}

te_core_wheel() {
  # Reassemble the TE core wheel from the staged parts and check its hash; prints its path.
  local name out
  name=$(awk '{print $2}' "$whl/base/te-core.sha256")
  out="$stage/$name"
  if [ ! -f "$out" ]; then
    local parts=()
    while read -r p; do parts+=("$stage/$p"); done <"$whl/base/te-core.parts"
    cat "${parts[@]}" >"$out.tmp" && mv "$out.tmp" "$out"
  fi
  if ! (cd "$stage" && sha256sum -c --quiet "$whl/base/te-core.sha256") >&2; then
    rm -f "$out" # re-assembled from freshly staged parts next time
    return 1
  fi
  echo "$out"
}

# pip_in DIR FILE...: install carried files into the prefix DIR, nothing from an index, no deps
pip_in() {
  local dir="$1"
  shift
  "$py" -m pip install -q --no-index --no-deps --no-build-isolation --ignore-installed \
    --no-warn-script-location --prefix "$dir" "$@"
}

write_env() { # write_env SITE_DIRS: the file callers source to use the install
  cat >"$prefix/env.sh" <<EOF
export PYTHONPATH="$1\${PYTHONPATH:+:\$PYTHONPATH}"
export PATH="$prefix/bin:\$PATH"
EOF
}

site_dirs() { find "$1" -maxdepth 5 -type d \( -name site-packages -o -name dist-packages \) | paste -sd:; }

install_te() {
  # Into its own prefix ($prefix/te), used only if `import transformer_engine.pytorch` works in the
  # end: a failed build must leave a clean TE-less install (megatron-core imports TE when present).
  # Returns non-zero on any failure; callers decide whether that is fatal.
  local te_prefix="$prefix/te" core archs
  rm -rf "$te_prefix"
  step "TE runtime deps: pydantic, nvdlfw-inspect, typing-extensions"
  pip_in "$te_prefix" "$whl"/base/{pydantic,pydantic_core,annotated_types,typing_inspection,typing_extensions,nvdlfw_inspect}-*.whl || return 1
  done_step
  step "transformer-engine-$TE_CUDA $TE_VERSION (core library, reassembled from parts)"
  core=$(te_core_wheel) || { echo "TE core wheel: SHA-256 mismatch (a part is damaged): stage again" >&2; return 1; }
  pip_in "$te_prefix" "$core" || return 1
  done_step
  step "transformer-engine $TE_VERSION (python package)"
  pip_in "$te_prefix" "$whl/base/transformer_engine-$TE_VERSION-py3-none-any.whl" || return 1
  done_step
  archs="${NVTE_CUDA_ARCHS:-$("$py" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}")')}" || return 1
  step "transformer_engine_torch $TE_VERSION: build from sdist (NVTE_CUDA_ARCHS=$archs MAX_JOBS=${MAX_JOBS:-$(nproc)})"
  # FORCE_BUILD: skip setup.py's attempt to fetch a prebuilt wheel from GitHub (no network here).
  # NCCL EP off: only EP>1 kernels use it and it needs NCCL's symmetric-memory headers.
  # cudnn.h: the sources include it, and the build looks only in the CUDA toolkit's include dir,
  # which has no cuDNN; the image's cuDNN comes as a pip package (nvidia-cudnn-cu13), add its headers.
  local cudnn_inc
  cudnn_inc=$("$py" -c 'import glob, os, sys
print(":".join(sorted({os.path.dirname(h) for p in sys.path if p
    for h in glob.glob(os.path.join(p, "nvidia", "**", "include", "cudnn.h"), recursive=True)})))')
  echo "   cudnn.h from: ${cudnn_inc:-(not found in the Python env; hoping for the toolkit)}"
  CPLUS_INCLUDE_PATH="$cudnn_inc${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}" \
    NVTE_PYTORCH_FORCE_BUILD=TRUE NVTE_FRAMEWORK=pytorch NVTE_CUDA_ARCHS="$archs" NVTE_WITH_NCCL_EP=0 \
    MAX_JOBS="${MAX_JOBS:-$(nproc)}" pip_in "$te_prefix" "$whl/base/transformer_engine_torch-$TE_VERSION.tar.gz" || return 1
  done_step
  step "import transformer_engine.pytorch"
  PYTHONPATH="$(site_dirs "$te_prefix")${PYTHONPATH:+:$PYTHONPATH}" "$py" -c 'import transformer_engine.pytorch' || return 1
  done_step
}

install() {
  local t_all
  t_all=$(date +%s)
  mkdir -p "$prefix"

  step "device: $("$py" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>/dev/null || echo "   nvidia-smi: not found"
  command -v nvcc >/dev/null && nvcc --version | tail -1 || echo "   nvcc: not on PATH"
  done_step

  step "megatron-core $MCORE_VERSION (carried wheel)"
  pip_in "$prefix" "$whl"/base/megatron_core-"$MCORE_VERSION"-*.whl
  done_step

  step "megatron-dpsl (this checkout)"
  pip_in "$prefix" "$repo"
  done_step
  write_env "$(site_dirs "$prefix" | tr ':' '\n' | grep -v "^$prefix/te/" | paste -sd:)" # usable even if TE fails

  local want_te="${DPSL_TE:-auto}" te_ok=0
  if [ "$want_te" != 0 ]; then
    if stage_parts >/dev/null; then
      if install_te; then
        te_ok=1
      elif [ "$want_te" = 1 ]; then
        echo "DPSL_TE=1 and the Transformer Engine install failed (above)" >&2
        exit 1
      else
        echo "== Transformer Engine install FAILED (above): going on without it (TE tests will skip)"
        rm -rf "$prefix/te"
      fi
    elif [ "$want_te" = 1 ]; then
      stage_parts || true
      echo "DPSL_TE=1 but TE-core parts are missing (above): stage them first (docs/gpu.md)" >&2
      exit 1
    else
      echo "== TE-core parts not all staged: skipping Transformer Engine (TE tests will skip)"
    fi
  fi

  # where pip put them (lib/python3.X/site-packages, or dist-packages on Debian-patched pythons);
  # TE's prefix only when it imported
  local site
  site=$(site_dirs "$prefix")
  if [ "$te_ok" = 0 ]; then site=$(echo "$site" | tr ':' '\n' | grep -v "^$prefix/te/" | paste -sd:); fi
  write_env "$site"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"

  step "versions"
  "$py" - <<'EOF'
import importlib, importlib.metadata as md
import torch
print(f"   python torch {torch.__version__} (cuda {torch.version.cuda})")
for dist in ("megatron-core", "megatron-dpsl", "transformer-engine", "transformer_engine_cu13", "transformer_engine_torch", "scipy"):
    try:
        print(f"   {dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"   {dist}: not installed")
import megatron.core, megatron_dpsl  # noqa: E401
print(f"   megatron.core from {megatron.core.__file__}")
try:
    import transformer_engine.pytorch as te
    fp8 = te.is_fp8_available(return_reason=True) if hasattr(te, "is_fp8_available") else "unknown"
    print(f"   transformer_engine.pytorch imports; fp8 available: {fp8}")
except Exception as e:  # report, do not fail: TE is optional
    print(f"   transformer_engine.pytorch does not import: {type(e).__name__}: {e}")
EOF
  done_step
  echo "== install total $(($(date +%s) - t_all)) s; now: source $prefix/env.sh"
}

case "${1:-install}" in
  --download) download ;;
  --stage) stage_parts ;;
  install | --install) install ;;
  -h | --help) sed -n '2,30p' "$0" ;;
  *) echo "unknown argument '$1': expected --download, --stage, --install or nothing" >&2; exit 2 ;;
esac
