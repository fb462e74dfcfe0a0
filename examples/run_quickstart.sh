# python -m megatron_dpsl.train.quickstart --out ${OUT:-outputs/quickstart} ${QUICKSTART_ARGS}
# The quickstart (dense GPT -> upcycled MoE -> aux loss vs DPSL vs DPSL modality priors) on 2 CPU ranks.
# Overrides: OUT (outputs/quickstart), QUICKSTART_ARGS (e.g. "--tiny" or "--moe-iters 300 --dpsl-coeff 0.01").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck disable=SC2086
exec python -m megatron_dpsl.train.quickstart --out "${OUT:-outputs/quickstart}" ${QUICKSTART_ARGS:-}
