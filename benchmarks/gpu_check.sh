#!/usr/bin/env bash
# The GPU check of the training benchmark: SiT-XL/2 at 256 px, per-GPU batch 32, bf16, ours against
# the released code's step, first without and then with --compile (each run prints images/s,
# ms/step with its breakdown, peak memory, MFU against --peak-tflops 989 and the host-device syncs
# of one step). About 5 minutes on one H100, most of it compiling.
#   bash benchmarks/gpu_check.sh                     # writes into $OUT if set, else /tmp/sra_gpu_check/
#   PYTHON=/path/to/python3 bash benchmarks/gpu_check.sh
#   bash benchmarks/gpu_check.sh --model SiT-T/2 ...   # extra flags override both runs' (the CPU test uses a tiny model)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/sra_gpu_check}
python=${PYTHON:-python3}
mkdir -p "$out"
common=(--model SiT-XL/2 --resolution 256 --batch-size 32 --mixed-precision bf16 --warmup 3 --steps 5 --rounds 3 "$@")

{ nvidia-smi; "$python" -c "import torch, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'accelerate', accelerate.__version__)"; } > "$out/env.txt" 2>&1
status=0
"$python" benchmarks/bench_train.py "${common[@]}" 2>&1 | tee "$out/train_sitxl2_bf16.txt" || status=1
"$python" benchmarks/bench_train.py "${common[@]}" --compile 2>&1 | tee "$out/train_sitxl2_bf16_compile.txt" || status=1
exit $status
