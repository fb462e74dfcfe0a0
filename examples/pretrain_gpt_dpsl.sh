# single node:  NPROC_PER_NODE=2 bash examples/pretrain_gpt_dpsl.sh
#   = torchrun --nproc-per-node ${NPROC_PER_NODE} -m megatron_dpsl.train.trainer ${ARGS}
# multi-node (run on every node):  NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node 0 host> MASTER_PORT=29500 bash examples/pretrain_gpt_dpsl.sh
#   = torchrun --nnodes ${NNODES} --node-rank ${NODE_RANK} --nproc-per-node ${NPROC_PER_NODE} --rdzv-backend c10d --rdzv-endpoint ${MASTER_ADDR}:${MASTER_PORT} --rdzv-id ${RDZV_ID} -m megatron_dpsl.train.trainer ${ARGS}
#
# Embedded trainer (megatron-core + DPSL router), Megatron-LM flag names. Named overrides (environment):
#   NNODES (1)  NODE_RANK (0)  NPROC_PER_NODE (2)  MASTER_ADDR (127.0.0.1)  MASTER_PORT (29500)  RDZV_ID (dpsl)
#   DATA_PATH (outputs/corpus; built here if missing)  SAVE (outputs/pretrain_gpt_dpsl)  LOAD (unset)
#   TP (1)  EP (2)  PP (1: pipeline stages; EP x PP must divide the ranks)  NUM_EXPERTS (8)  TOPK (2)  TRAIN_ITERS (200)  WARMUP (TRAIN_ITERS/20)  MBS (4)  GBS (16)
#   LB_TYPE (dpsl)  DPSL_COEFF (0.01)  DPSL_ALPHA (1.0)  EXTRA_ARGS (appended verbatim)
# On GPU nodes the trainer picks nccl + CUDA; on CPU, gloo (one process per core is plenty).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-2}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-dpsl}
DATA_PATH=${DATA_PATH:-outputs/corpus}
SAVE=${SAVE:-outputs/pretrain_gpt_dpsl}
TP=${TP:-1}
EP=${EP:-2}
PP=${PP:-1}
NUM_EXPERTS=${NUM_EXPERTS:-8}
TOPK=${TOPK:-2}
TRAIN_ITERS=${TRAIN_ITERS:-200}
MBS=${MBS:-4}
GBS=${GBS:-16}
LB_TYPE=${LB_TYPE:-dpsl}
DPSL_COEFF=${DPSL_COEFF:-0.01}
DPSL_ALPHA=${DPSL_ALPHA:-1.0}
WARMUP=${WARMUP:-$(( TRAIN_ITERS / 20 ))}

if [ ! -f "${DATA_PATH}/train_tokens.bin" ] && [ "${NODE_RANK}" = "0" ]; then
  python -m megatron_dpsl.train.corpus --out "${DATA_PATH}"
fi

ARGS=(
  --num-layers 2 --hidden-size 64 --ffn-hidden-size 256 --num-attention-heads 4
  --seq-length 128 --max-position-embeddings 128 --disable-bias-linear
  --num-experts "${NUM_EXPERTS}" --moe-router-topk "${TOPK}" --moe-ffn-hidden-size 128
  --moe-router-load-balancing-type "${LB_TYPE}" --moe-dpsl-coeff "${DPSL_COEFF}" --moe-dpsl-alpha "${DPSL_ALPHA}"
  --moe-token-dispatcher-type allgather
  --tensor-model-parallel-size "${TP}" --expert-model-parallel-size "${EP}"
  --pipeline-model-parallel-size "${PP}"
  --micro-batch-size "${MBS}" --global-batch-size "${GBS}" --train-iters "${TRAIN_ITERS}"
  --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters "${WARMUP}"
  --data-path "${DATA_PATH}" --save "${SAVE}" --save-interval 100
  --tensorboard-dir "${SAVE}/tensorboard" --log-interval 10 --eval-interval 50 --eval-iters 4
)
if [ "${TP}" -gt 1 ]; then ARGS+=(--sequence-parallel); fi
if [ -n "${LOAD:-}" ]; then ARGS+=(--load "${LOAD}"); fi
# shellcheck disable=SC2206
ARGS+=(${EXTRA_ARGS:-})

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ "${NNODES}" = "1" ]; then
  exec torchrun --nproc-per-node "${NPROC_PER_NODE}" -m megatron_dpsl.train.trainer "${ARGS[@]}"
else
  exec torchrun --nnodes "${NNODES}" --node-rank "${NODE_RANK}" --nproc-per-node "${NPROC_PER_NODE}" \
    --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR}:${MASTER_PORT}" --rdzv-id "${RDZV_ID}" \
    -m megatron_dpsl.train.trainer "${ARGS[@]}"
fi
