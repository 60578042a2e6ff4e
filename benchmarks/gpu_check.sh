#!/usr/bin/env bash
# The GPU check: one markdown table (OUT/table.md, also printed) and the raw reports beside it, within BUDGET_S
# seconds (default 470: the whole check ends within 8 minutes; a part that would run past it is cut off and its
# row says so). Parts, most important first:
#   training   bench_train.py, SiT-XL/2 with the README's flags (256 px, batch 32, fp16, blocks 8 -> 20), ours
#              against the released step, eager then --compile: img/s, ratio, MFU (--peak-tflops 989, dense
#              bf16/fp16 of an H100/H200), graph breaks, host-device syncs per step
#   sampling   bench_sample.py, SiT-XL/2 SDE with gen.sh's guidance (CFG 1.8 on t <= 0.7), 50 steps, batch 64:
#              fp32 against the released loop, then ours alone in bf16 and compiled fp32
#   inception  evaluations/bench_inception.py on the GPU (INCEPTION_WEIGHTS, else torch-fidelity's cached file,
#              else --random-weights: the values do not change the speed), then the evaluator's precision/recall
#              of 50,000 x 50,000 features on the GPU (evaluations/bench_precision_recall.py)
#   released   vs_released.sh "$RELEASED_DIR" when RELEASED_DIR is set (RELEASED_PYTHON: its environment's Python)
#
#   bash benchmarks/gpu_check.sh                          # writes into $OUT if set, else /tmp/sra_gpu_check/
#   RELEASED_DIR=~/SRA PYTHON=/path/to/python3 bash benchmarks/gpu_check.sh
#   bash benchmarks/gpu_check.sh --model SiT-T/2 ...      # extra flags override the training runs' (tiny on a CPU
#                                                         # in the test, with SAMPLE_FLAGS, INCEPTION_FLAGS, PR_FLAGS
#                                                         # and VS_RELEASED_FLAGS for the other parts)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/sra_gpu_check}
python=${PYTHON:-python3}
budget=${BUDGET_S:-470}
mkdir -p "$out"
start=$SECONDS

# part NAME COMMAND...: runs COMMAND into OUT/NAME.txt within what is left of the budget
part() {
  local name=$1 left=$((budget - (SECONDS - start)))
  shift
  if [ "$left" -lt 5 ]; then
    echo "not run: the ${budget} s budget was spent" > "$out/$name.txt"
    return 1
  fi
  echo "== $name (${left} s left)" >&2
  timeout --kill-after=10 "$left" "$@" > "$out/$name.txt" 2>&1
  local code=$?
  [ "$code" -eq 124 ] && echo "cut off: the ${budget} s budget was spent" >> "$out/$name.txt"
  return $code
}

{ nvidia-smi; "$python" -c "import torch, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'accelerate', accelerate.__version__)"; } > "$out/env.txt" 2>&1
status=0
train=(--model SiT-XL/2 --resolution 256 --batch-size 32 --mixed-precision fp16 --block-out-s 8 --block-out-t 20
       --warmup 3 --steps 5 --rounds 2 "$@")
part train_eager "$python" benchmarks/bench_train.py "${train[@]}" || status=1
part train_compiled "$python" benchmarks/bench_train.py "${train[@]}" --compile || status=1

read -r -a sample_extra <<< "${SAMPLE_FLAGS:-}"
sample=(--model SiT-XL/2 --resolution 256 --num-samples 64 --num-steps 50 --cfg-scale 1.8 --guidance-high 0.7
        --warmup-steps 3 --rounds 1 "${sample_extra[@]}")
part sample_fp32 "$python" benchmarks/bench_sample.py "${sample[@]}" --precision fp32 || status=1
part sample_bf16 "$python" benchmarks/bench_sample.py "${sample[@]}" --precision bf16 --no-reference || status=1
part sample_compiled "$python" benchmarks/bench_sample.py "${sample[@]}" --precision fp32 --compile --no-reference \
  || status=1

weights=${INCEPTION_WEIGHTS:-$("$python" -c "import sys; sys.path.insert(0, 'evaluations')
from inception import default_weights_path; print(default_weights_path())")}
weights_flags=(--random-weights)
[ -f "$weights" ] && weights_flags=(--inception-weights "$weights")
read -r -a inception_extra <<< "${INCEPTION_FLAGS:-}"
part inception "$python" evaluations/bench_inception.py --device cuda "${weights_flags[@]}" "${inception_extra[@]}" \
  || status=1
read -r -a pr_extra <<< "${PR_FLAGS:-}"
part precision_recall "$python" evaluations/bench_precision_recall.py --device cuda --ref 50000 --samples 50000 \
  --repeats 1 "${pr_extra[@]}" || status=1

if [ -n "${RELEASED_DIR:-}" ]; then
  read -r -a released_extra <<< "${VS_RELEASED_FLAGS:-}"
  # its own budget ends 30 s before the check's, so that it prints the runs that finished
  part vs_released env PYTHON="$python" bash benchmarks/vs_released.sh "$RELEASED_DIR" \
    --budget-s $((budget - (SECONDS - start) - 30)) \
    --released-python "${RELEASED_PYTHON:-$python}" --train-steps 20 --warmup 5 --sample-batches 3 \
    --train-variant=--no-compile --sample-variant="--precision bf16" --workdir "$out/vs_released" --keep \
    "${released_extra[@]}" || status=1
fi

"$python" benchmarks/gpu_check_table.py "$out" | tee "$out/table.md"
exit $status
