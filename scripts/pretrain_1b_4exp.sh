#!/usr/bin/env bash
# ~1.3B-parameter base (24 layers, hidden 2048, 16 heads, seq 2048) with 4 SwiGLU experts
# (top-2, every layer MoE), global batch 256, bf16 with fp32 master weights, ZeRO-1, on GPUs.
#
# Single node:  bash scripts/pretrain_1b_4exp.sh
# Multi-node:   on every node, NNODES=4 NODE_RANK=<i> MASTER_ADDR=<node0> bash scripts/pretrain_1b_4exp.sh
# Overridable:  GPUS_PER_NODE, MASTER_PORT, TP, EP, MICRO_BATCH, DATA_PATH, TOKENIZER_MODEL,
#               SAVE_DIR, LOAD_DIR, TRAIN_ITERS, MAX_RESTARTS, WANDB_PROJECT, EXTRA_ARGS
# Elastic:      MIN_NNODES=<min> (NNODES is the max), RDZV_ID; see the README's "Elastic training"
# A worker that dies (a crashed or killed process, out of memory) makes torchrun restart every
# worker, up to MAX_RESTARTS times; they resume from the latest checkpoint in LOAD_DIR.
# Checkpoints are written in the background (--async-save) while training continues.
set -euo pipefail
cd "$(dirname "$0")/.."

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
TP=${TP:-1}
EP=${EP:-4}
MICRO_BATCH=${MICRO_BATCH:-4}
GLOBAL_BATCH=${GLOBAL_BATCH:-256}
TRAIN_ITERS=${TRAIN_ITERS:-100000}
DATA_PATH=${DATA_PATH:-}            # e.g. "0.7 /data/web_text_document 0.3 /data/code_text_document"
TOKENIZER_MODEL=${TOKENIZER_MODEL:-}
SAVE_DIR=${SAVE_DIR:-checkpoints/moe-1b-4e}
LOAD_DIR=${LOAD_DIR:-$SAVE_DIR}
MAX_RESTARTS=${MAX_RESTARTS:-3}
PYTHON=${PYTHON:-python3}

data_args=(--mock-data --vocab-size 32000)
if [ -n "$DATA_PATH" ]; then
    [ -n "$TOKENIZER_MODEL" ] || { echo "set TOKENIZER_MODEL with DATA_PATH" >&2; exit 2; }
    # shellcheck disable=SC2206
    data_args=(--data-path $DATA_PATH --tokenizer-model "$TOKENIZER_MODEL" --split 969,30,1)
fi
wandb_args=()
if [ -n "${WANDB_PROJECT:-}" ]; then
    wandb_args=(--wandb-project "$WANDB_PROJECT" --wandb-exp-name "moe-1b-4e-tp${TP}-ep${EP}")
fi

# Elastic mode (MIN_NNODES set): between MIN_NNODES and NNODES nodes, c10d rendezvous on the store
# that tools/rendezvous_store.py serves at MASTER_ADDR:MASTER_PORT (start it first; the Slurm
# wrapper does), the agent store not shared with the workers (torch's sharing hangs a node that
# joins), --elastic for the layout of another world and a save whenever torchrun stops the workers
# for a node that leaves on purpose or joins.  Otherwise a static rendezvous.
if [ -n "${MIN_NNODES:-}" ]; then
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    launch_args=(--nnodes "$MIN_NNODES:$NNODES" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"
                 --rdzv-conf is_host=false --rdzv-id "${RDZV_ID:-megamoe-1b-4e}")
    elastic_args=(--elastic --save-on-rendezvous-change)
else
    launch_args=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
    elastic_args=()
fi

exec "$PYTHON" -m torch.distributed.run \
    "${launch_args[@]}" --nproc-per-node "$GPUS_PER_NODE" --max-restarts "$MAX_RESTARTS" \
    pretrain_moe.py \
    "${elastic_args[@]}" \
    --device cuda --bf16 \
    --num-layers 24 --hidden-size 2048 --num-attention-heads 16 --ffn-hidden-size 5632 \
    --seq-length 2048 --max-position-embeddings 2048 \
    --normalization RMSNorm --swiglu --position-embedding-type rope --disable-bias-linear \
    --untie-embeddings-and-output-weights \
    --num-experts 4 --moe-router-topk 2 --moe-aux-loss-coeff 0.01 --moe-z-loss-coeff 0.001 \
    --tensor-model-parallel-size "$TP" --expert-model-parallel-size "$EP" --use-distributed-optimizer \
    --overlap-grad-reduce --compile \
    --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --train-iters "$TRAIN_ITERS" \
    --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2000 \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --clip-grad 1.0 \
    "${data_args[@]}" \
    --eval-interval 1000 --eval-iters 10 \
    --save "$SAVE_DIR" --load "$LOAD_DIR" --save-interval 1000 --keep-last 3 --async-save --exit-signal-handler \
    --log-interval 10 --log-json "$SAVE_DIR.log.jsonl" \
    "${wandb_args[@]}" ${EXTRA_ARGS:-}
