#!/usr/bin/env bash
# Samples 50,000 images from a SiT-XL/2 + SRA checkpoint for FID with the released settings and writes
# SAMPLE_DIR/<settings>.npz for the ADM evaluation suite. Every variable below can be set from the environment:
#   SAMPLE_DIR=samples NUM_GPUS=8 bash gen.sh      # the released 256 px checkpoint, downloaded once by name
#   RESOLUTION=512 bash gen.sh                     # the released 512 px one
#   CKPT=path/to/checkpoint.pt bash gen.sh         # yours (or a released file downloaded by hand)
# An interrupted run resumes where it stopped when started again with the same settings.
set -euo pipefail
cd "$(dirname "$0")"

NUM_GPUS=${NUM_GPUS:-8}
SAMPLE_DIR=${SAMPLE_DIR:-samples}
RESOLUTION=${RESOLUTION:-256}
MODEL=${MODEL:-SiT-XL/2}
VAE=${VAE:-ema}
PER_PROC_BATCH_SIZE=${PER_PROC_BATCH_SIZE:-64}
NUM_FID_SAMPLES=${NUM_FID_SAMPLES:-50000}
MODE=${MODE:-sde}
NUM_STEPS=${NUM_STEPS:-250}
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

# Guidance of the released results: CFG 1.8 on t in [0, 0.7] at 256 px, CFG 2.5 with a guidance interval at 512 px
# (the released README does not give the 512 px bounds; [0, 0.7] is assumed, override with GUIDANCE_LOW/HIGH).
case "$RESOLUTION" in
  256) DEFAULT_CFG=1.8 DEFAULT_LOW=0.0 DEFAULT_HIGH=0.7 DEFAULT_CKPT=sitxl-sra-res256-ep800.pt ;;
  512) DEFAULT_CFG=2.5 DEFAULT_LOW=0.0 DEFAULT_HIGH=0.7 DEFAULT_CKPT=sitxl-sra-res512-ep400.pt ;;
  *) echo "gen.sh: RESOLUTION must be 256 or 512 (got $RESOLUTION); call generate.py directly for others" >&2
     exit 2 ;;
esac
CKPT=${CKPT:-$DEFAULT_CKPT}  # a released name is downloaded once into the Hugging Face cache (HF_HOME)
CFG_SCALE=${CFG_SCALE:-$DEFAULT_CFG}
GUIDANCE_LOW=${GUIDANCE_LOW:-$DEFAULT_LOW}
GUIDANCE_HIGH=${GUIDANCE_HIGH:-$DEFAULT_HIGH}

torchrun --nnodes="$NNODES" "${NODE_FLAGS[@]}" --nproc_per_node="$NUM_GPUS" generate.py \
  --ckpt="$CKPT" \
  --sample-dir="$SAMPLE_DIR" \
  --model="$MODEL" \
  --num-classes=1000 \
  --resolution="$RESOLUTION" \
  --vae="$VAE" \
  --per-proc-batch-size="$PER_PROC_BATCH_SIZE" \
  --num-fid-samples="$NUM_FID_SAMPLES" \
  --mode="$MODE" \
  --num-steps="$NUM_STEPS" \
  --cfg-scale="$CFG_SCALE" \
  --guidance-low="$GUIDANCE_LOW" \
  --guidance-high="$GUIDANCE_HIGH" \
  --path-type=linear \
  --global-seed="$GLOBAL_SEED" \
  --precision="$PRECISION" \
  "${COMPILE_FLAGS[@]}"
