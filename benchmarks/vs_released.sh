#!/usr/bin/env bash
# Our train.py and generate.py against the released code's (your own checkout of it, RELEASED_DIR), with the same
# flags on the same synthetic latents and a tiny VAE served offline; prints one markdown table (method:
# benchmarks/vs_released.py's docstring). Extra flags go to vs_released.py.
#   bash benchmarks/vs_released.sh RELEASED_DIR                               # SiT-XL/2 and DiT-XL/2, on a GPU
#   bash benchmarks/vs_released.sh RELEASED_DIR --train-variant=--no-compile --sample-variant="--precision bf16"
#   PYTHON=/path/to/python3 bash benchmarks/vs_released.sh RELEASED_DIR ...
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: bash benchmarks/vs_released.sh RELEASED_DIR [vs_released.py flags]" >&2
  exit 2
fi
exec "${PYTHON:-python3}" "$(dirname "$0")/vs_released.py" "$@"
