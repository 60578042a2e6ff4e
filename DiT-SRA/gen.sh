#!/usr/bin/env bash
# Samples 50,000 images from a DiT-XL/2 + SRA checkpoint for FID with the released settings (250 respaced DDPM steps,
# no guidance) and writes SAMPLE_DIR/<settings>.npz for the ADM evaluation suite. Every variable below can be set
# from the environment:
#   CKPT=exps/ditxl-ab816-t0.2-res256/checkpoints/epoch-799.pt SAMPLE_DIR=samples NUM_GPUS=8 bash gen.sh
#   CFG_SCALE=1.5 NUM_GPUS=1 bash gen.sh
# An interrupted run resumes where it stopped when started again with the same settings.
set -euo pipefail
cd "$(dirname "$0")"

NUM_GPUS=${NUM_GPUS:-8}
CKPT=${CKPT:-exps/ditxl-ab816-t0.2-res256/checkpoints/epoch-799.pt}
SAMPLE_DIR=${SAMPLE_DIR:-samples}
RESOLUTION=${RESOLUTION:-256}
MODEL=${MODEL:-DiT-XL/2}
VAE=${VAE:-ema}
PER_PROC_BATCH_SIZE=${PER_PROC_BATCH_SIZE:-64}
NUM_FID_SAMPLES=${NUM_FID_SAMPLES:-50000}
NUM_SAMPLING_STEPS=${NUM_SAMPLING_STEPS:-250}
CFG_SCALE=${CFG_SCALE:-1.0}
GLOBAL_SEED=${GLOBAL_SEED:-0}
PRECISION=${PRECISION:-fp32}  # the released numbers; bf16 is faster (its cost in quality: README, "Sampling for FID")
COMPILE=${COMPILE:-1}         # generate.py compiles the network call on GPUs; COMPILE=0 runs it eagerly (--no-compile)
COMPILE_FLAGS=()
if [ "$COMPILE" = 0 ]; then COMPILE_FLAGS=(--no-compile); fi
# Several nodes: on each, NNODES=2 NODE_RANK=0 (1, ...) MASTER_ADDR=<node 0's address> [MASTER_PORT=29500] bash gen.sh,
# with SAMPLE_DIR on a filesystem every node shares (README, "Several nodes").
NNODES=${NNODES:-1}
NODE_FLAGS=()
if [ "$NNODES" != 1 ]; then
  NODE_FLAGS=(--node_rank="${NODE_RANK:?NODE_RANK is needed with NNODES}" \
              --master_addr="${MASTER_ADDR:?MASTER_ADDR is needed with NNODES}" --master_port="${MASTER_PORT:-29500}")
fi

torchrun --nnodes="$NNODES" "${NODE_FLAGS[@]}" --nproc_per_node="$NUM_GPUS" generate.py \
  --ckpt="$CKPT" \
  --sample-dir="$SAMPLE_DIR" \
  --model="$MODEL" \
  --num-classes=1000 \
  --resolution="$RESOLUTION" \
  --vae="$VAE" \
  --per-proc-batch-size="$PER_PROC_BATCH_SIZE" \
  --num-fid-samples="$NUM_FID_SAMPLES" \
  --sampler=ddpm \
  --num-sampling-steps="$NUM_SAMPLING_STEPS" \
  --cfg-scale="$CFG_SCALE" \
  --global-seed="$GLOBAL_SEED" \
  --precision="$PRECISION" \
  "${COMPILE_FLAGS[@]}"
