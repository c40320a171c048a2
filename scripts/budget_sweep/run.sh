#!/bin/bash
# Budget sweep: train `tiny` variants concurrently on one GPU, each for the optimiser steps it gets in
# 15 minutes on the 2-core CPU (measured with `retina-train bench`), then evaluate each on the test split.
#
#   scripts/budget_sweep/run.sh WORKDIR [RUN ...]      RUN = name:config:steps:seed:lr
#
# config is a built-in name or a file in scripts/budget_sweep/configs (without .json). With no RUN, the
# runs reported in the README (Results, "Budget sweep") are made. PYTHON (default python3) runs the code.
set -u
WORK=${1:?usage: run.sh WORKDIR [RUN ...]}; shift
PYTHON=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)
RUNS=("$@")
if [ ${#RUNS[@]} -eq 0 ]; then
  RUNS=(
    tiny-224-mae:tiny-224-mae:685:0:5e-4 tiny-224-mae-imageonly:tiny-224-mae-imageonly:710:0:5e-4
    tiny-224-mae-imageonly-s1:tiny-224-mae-imageonly:710:1:5e-4
    tiny-112-mae-imageonly:tiny-112-mae-imageonly:1920:0:5e-4 tiny-112-mae-imageonly-s1:tiny-112-mae-imageonly:1920:1:5e-4
    tiny-112-mae-imageonly-s2:tiny-112-mae-imageonly:1920:2:5e-4
    tiny-224p32-mae-imageonly:tiny-224p32-mae-imageonly:1530:0:5e-4
    tiny-112-depth6-mae-imageonly:tiny-112-depth6-mae-imageonly:1650:0:5e-4
    tiny:tiny:2170:0:5e-4 tiny-s1:tiny:2170:1:5e-4 tiny-s2:tiny:2170:2:5e-4 tiny-s3:tiny:2170:3:5e-4
    tiny-lr1e-3:tiny:2170:0:1e-3 tiny-lr1e-3-s1:tiny:2170:1:1e-3
  )
fi
export OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$WORK"
if [ ! -d "$WORK/archive" ]; then
  $PYTHON -m training.cli synth --out "$WORK/archive" --n 3000 --seed 1 --size 224 --workers "$(nproc)" \
    >"$WORK/synth.log" 2>&1 || { cat "$WORK/synth.log"; exit 1; }
fi
$PYTHON -m training.cli split "$WORK/archive" --out "$WORK/splits.json" --seed 0 >/dev/null
for spec in "${RUNS[@]}"; do
  IFS=: read -r name config steps seed lr <<< "$spec"
  [ -f "$HERE/configs/$config.json" ] && config="$HERE/configs/$config.json"
  (
    $PYTHON -m training.cli fit --config "$config" --archive "$WORK/archive" --splits "$WORK/splits.json" \
      --out "$WORK/$name" --epochs 400 --batch-size 32 --balance 0.5 --max-steps "$steps" --seed "$seed" \
      --lr "$lr" --max-minutes 4 >"$WORK/$name.fit.log" 2>&1 &&
    $PYTHON -m training.cli evaluate --run "$WORK/$name" --archive "$WORK/archive" --splits "$WORK/splits.json" \
      >"$WORK/$name.eval.log" 2>&1 || echo "$name failed: see $WORK/$name.*.log"
  ) &
done
wait
$PYTHON "$HERE/summary.py" "$WORK" "${RUNS[@]%%:*}"
