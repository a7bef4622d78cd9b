#!/usr/bin/env bash
# The CPU-sized CIFAR-10 validation: six strategies, 3 seeds, 10,000 training images, 10 epochs, clean and with 40% of
# the training labels noisy. The two comparisons run side by side, one torch thread each (on a 2-core machine that is
# faster than one after the other with two threads each). Each run's folder and wall time go to bench/results/cifar10_*.
#   bash bench/cifar10_validation.sh [CIFAR10_DIR]     (default: ../shared/data/cifar10)
set -euo pipefail
data=${1:-../shared/data/cifar10}
one() { local noise=$1 out=$2
  local cmd=(fastai-ls compare --dataset cifar10 --path "$data" --train-size 10000 --epochs 10 --seeds 3 --threads 1
             --strategies ce ls anneal anneal:two_stage ols group --label-noise "$noise" --quiet --out "$out")
  local start=$(date +%s)
  "${cmd[@]}" > "$out.log" 2>&1
  { echo "command: ${cmd[*]}"; echo "wall time: $(( $(date +%s) - start )) s on $(nproc) CPU cores, side by side with the other comparison"; } > "$out/walltime.txt"
}
one 0 bench/results/cifar10_clean & one 0.4 bench/results/cifar10_noise40 & wait
