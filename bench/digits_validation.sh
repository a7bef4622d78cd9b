#!/usr/bin/env bash
# The digits comparisons of the compare tutorial: 5 seeds at 100, 200 and 1,000 training images, five strategies,
# and at 1,000 with 40% of the training labels noisy.
# Each run's folder and wall time go to bench/results/digits_N; about 15 minutes on 2 cores (more while other work runs).
#   bash bench/digits_validation.sh
set -euo pipefail
for n in 100 200 1000; do
  out=bench/results/digits_$n
  cmd=(fastai-ls compare --seeds 5 --train-size "$n" --strategies ce ls anneal anneal:two_stage ols --quiet --out "$out")
  start=$(date +%s)
  "${cmd[@]}"
  echo "command: ${cmd[*]}" > "$out/walltime.txt"
  echo "wall time: $(( $(date +%s) - start )) s on $(nproc) CPU cores" >> "$out/walltime.txt"
done
# and 40% of the 1,000 training labels noisy (the calibration and validation labels stay clean)
out=bench/results/digits_1000_noise40
cmd=(fastai-ls compare --seeds 5 --train-size 1000 --label-noise 0.4 --strategies ce ls anneal anneal:two_stage ols --quiet --out "$out")
start=$(date +%s)
"${cmd[@]}"
echo "command: ${cmd[*]}" > "$out/walltime.txt"
echo "wall time: $(( $(date +%s) - start )) s on $(nproc) CPU cores" >> "$out/walltime.txt"
