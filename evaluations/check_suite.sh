#!/usr/bin/env bash
# Scores the ADM suite's own ImageNet 256 pair with this evaluator and prints our figures beside the ones the suite's
# README publishes for it (IS 215.84, FID 3.9426, sFID 6.1404, Precision 0.8265, Recall 0.5309), with the differences.
# Needs internet once: the reference batch (~1.5 GB), the sample batch (50,000 images, ~9 GB) and the Inception weights
# (~100 MB) go to SUITE_CACHE (default ~/.cache/sra-eval-suite) and are read from there later. Flags go to evaluator.py:
#   bash evaluations/check_suite.sh --device cuda --batch-size 256
#   SUITE_CACHE=/data/suite bash evaluations/check_suite.sh --device cuda
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${SUITE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sra-eval-suite}
python=${PYTHON:-python}

batches=https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256
ref=VIRTUAL_imagenet256_labeled.npz
sample=admnet_guided_upsampled_imagenet256.npz
weights_url=https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth
weights=${weights_url##*/}

# Downloads $1 to $cache/$2 unless it is there; a partial file keeps the .part suffix and is resumed next time.
fetch() {
  local url=$1 dest=$cache/$2
  [ -f "$dest" ] && return 0
  command -v curl >/dev/null || { echo "error: check_suite.sh needs curl to download $url to $dest" >&2; exit 1; }
  if ! curl --silent --fail --location --head --connect-timeout 10 --max-time 30 --output /dev/null "$url"; then
    echo "error: cannot reach $url (no internet?); check_suite.sh needs it once, then reads $dest" >&2
    exit 1
  fi
  echo "downloading $url to $dest" >&2
  if ! curl --fail --location --connect-timeout 10 --retry 3 --continue-at - --progress-bar --output "$dest.part" \
      "$url"; then
    echo "error: the download of $url stopped; run check_suite.sh again to resume it" >&2
    exit 1
  fi
  mv "$dest.part" "$dest"
}

mkdir -p "$cache"
fetch "$batches/$ref" "$ref"
fetch "$batches/$sample" "$sample"
fetch "$weights_url" "$weights"

"$python" "$here/evaluator.py" "$cache/$ref" "$cache/$sample" --inception-weights "$cache/$weights" \
  --cache-dir "$cache" --json "$cache/ours.json" "$@"
"$python" "$here/compare_with_suite.py" "$cache/ours.json"
