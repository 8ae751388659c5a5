#!/usr/bin/env bash
# A newcomer's first run: sets up .venv, then trains a small MoE GPT on CPU with 4 ranks
# (TP=2 x DP=2, EP=2, ZeRO-1) on the built-in default corpus (Python's standard-library sources,
# tokenised on first use into cache/default_corpus).  A few minutes on 2 cores; the loss falls.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
OUT=${OUT_DIR:-runs/quickstart}
rm -rf "$OUT"
mkdir -p "$OUT"
export OMP_NUM_THREADS=1
.venv/bin/python -m torch.distributed.run --standalone --nproc-per-node 4 pretrain_moe.py \
    --device cpu \
    --num-layers 2 --hidden-size 128 --num-attention-heads 4 --ffn-hidden-size 256 \
    --seq-length 128 --swiglu --disable-bias-linear \
    --num-experts 4 --moe-router-topk 2 --moe-aux-loss-coeff 0.01 --moe-z-loss-coeff 0.001 \
    --tensor-model-parallel-size 2 --expert-model-parallel-size 2 --use-distributed-optimizer \
    --micro-batch-size 4 --global-batch-size 16 --train-iters ${TRAIN_ITERS:-60} \
    --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 5 --lr-decay-style cosine --clip-grad 1.0 \
    --eval-interval 30 --eval-iters 2 --log-interval 5 \
    --save "$OUT/checkpoints" --log-json "$OUT/log.jsonl"
echo
echo "checkpoint: $OUT/checkpoints   log (one JSON object per log step): $OUT/log.jsonl"
echo "plot it:    .venv/bin/python tools/plot_logs.py $OUT/log.jsonl --out $OUT/loss.png"
