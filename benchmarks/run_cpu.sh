#!/usr/bin/env bash
# The method card's CPU tables: every preset (configs/bench/*.yaml) profiled, then its variants side by
# side, 2 repetitions each, one thread. Sizes are kept small so the whole script fits a short session on
# 2 shared cores; raise them on the command line (--epochs, --data.init_args.train_samples) on a quiet
# machine. Usage: bash benchmarks/run_cpu.sh [output folder]
set -euo pipefail
OUT=${1:-benchmarks/results}
BENCH=${BENCH:-ldb-bench}
export OMP_NUM_THREADS=1
for preset in quick mnist1d-cnn resnet18 resnet18-imagenet-stem vit-small resnet18-digits resnet18-mnist1d; do
  $BENCH --config "configs/bench/$preset.yaml" --profile --out "$OUT/profiles/$preset"
done
time $BENCH --quick --out "$OUT/quick"
$BENCH --config configs/bench/mnist1d-cnn.yaml --out "$OUT/mnist1d-cnn"
$BENCH --config configs/bench/resnet18.yaml --out "$OUT/resnet18"
$BENCH --config configs/bench/resnet18-imagenet-stem.yaml --out "$OUT/resnet18-imagenet-stem"
$BENCH --config configs/bench/vit-small.yaml --out "$OUT/vit-small"
$BENCH --config configs/bench/resnet18-digits.yaml --out "$OUT/resnet18-digits"
$BENCH --config configs/bench/resnet18-mnist1d.yaml --out "$OUT/resnet18-mnist1d"
