#!/usr/bin/env bash
# GPU validation: the pets comparison on the 370-photo sample with resnet34 and fp16, then the loss
# benchmark on CUDA. Works offline. Run from anywhere:
#
#     bash bench/gpu_pets.sh [OUT_DIR]        # default OUT_DIR: ./gpu_results
#
# It runs the code of this checkout, with the dependencies that `pip install -e ".[dev]"` installs. PYTHON picks the
# interpreter (default python3), PETS the images (default: the committed sample); paths are relative to where it runs.
#
# Pretrained weights: the first comparison fine-tunes ImageNet resnet34 weights (`fine_tune(4)`, the setting of the
# published anchors) when torchvision has them cached or can download them. On a machine without internet, copy
# resnet34-b627a593.pth into $TORCH_HOME/hub/checkpoints (default TORCH_HOME: ~/.cache/torch). Without them
# `--scratch-fallback` says so on stderr and trains from random weights (`fit_one_cycle`), and summary.md says
# "from scratch". The second comparison always trains from scratch for longer, so that there is a meaningful number
# without any download. Time per epoch is in each summary.md (and the `epoch_s` column of results.csv).
# `compare` never overwrites results: give a new OUT_DIR to run again. A comparison with a failed run (status 1) is
# reported and the script goes on to the next one.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(realpath -m "${1:-gpu_results}")
PETS=$(realpath -m "${PETS:-$REPO/tests/data/oxford-iiit-pet}")
PY=${PYTHON:-python3}
[[ $PY == */* ]] && PY=$(realpath -m "$PY")
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
"$PY" - <<'PY' | tee "$OUT/device.txt"
import torch, fastai
assert torch.cuda.is_available(), "no CUDA GPU visible to torch"
print(f"{torch.cuda.get_device_name(0)}; torch {torch.__version__} (CUDA {torch.version.cuda}); fastai {fastai.__version__}")
PY
run() { local name=$1; shift
  local t0=$SECONDS
  local status=0
  "$PY" -m fastai_ls.compare --dataset pets --path "$PETS" --arch resnet34 --device cuda --fp16 \
      --strategies ce ls anneal ols group --out "$OUT/$name" "$@" 2>&1 | tee "$OUT/$name.log" || status=$?
  echo "$name: wall $((SECONDS - t0)) s, exit status $status" | tee -a "$OUT/walltimes.txt"
}
run pets_resnet34_4epochs --seeds 3 --epochs 4 --scratch-fallback
run pets_resnet34_scratch --seeds 3 --epochs 20 --no-pretrained
"$PY" bench/bench_loss.py --device cuda 2>&1 | tee "$OUT/bench_loss.txt"
echo; for f in "$OUT"/pets_*/summary.md; do echo "== $f"; cat "$f"; echo; done
