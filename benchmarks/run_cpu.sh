#!/usr/bin/env bash
# The method card's CPU tables: every preset (configs/bench/*.yaml) profiled, then its variants side by
# side, 3 repetitions each (the fewest a verdict needs), one thread, each comparison bounded by the
# profile measured first (--profile-json); --overwrite replaces earlier results. Sizes are kept small so the whole script fits a short session on
# 2 shared cores; raise them on the command line (--epochs, --data.init_args.train_samples) on a quiet
# machine. Usage: bash benchmarks/run_cpu.sh [output folder]
set -euo pipefail
OUT=${1:-benchmarks/results}
BENCH=${BENCH:-ldb-bench}
export OMP_NUM_THREADS=1
for preset in quick mnist1d-cnn resnet18 resnet18-imagenet-stem vit-small resnet18-digits resnet18-mnist1d; do
  $BENCH --config "configs/bench/$preset.yaml" --profile --out "$OUT/profiles/$preset" --overwrite
done
time $BENCH --quick --profile-json "$OUT/profiles/quick/profile.json" --out "$OUT/quick" --overwrite
$BENCH --config configs/bench/mnist1d-cnn.yaml --profile-json "$OUT/profiles/mnist1d-cnn/profile.json" --out "$OUT/mnist1d-cnn" --overwrite
$BENCH --config configs/bench/resnet18.yaml --profile-json "$OUT/profiles/resnet18/profile.json" --out "$OUT/resnet18" --overwrite
$BENCH --config configs/bench/resnet18-imagenet-stem.yaml --profile-json "$OUT/profiles/resnet18-imagenet-stem/profile.json" --out "$OUT/resnet18-imagenet-stem" --overwrite
$BENCH --config configs/bench/vit-small.yaml --profile-json "$OUT/profiles/vit-small/profile.json" --out "$OUT/vit-small" --overwrite
$BENCH --config configs/bench/resnet18-digits.yaml --profile-json "$OUT/profiles/resnet18-digits/profile.json" --out "$OUT/resnet18-digits" --overwrite
$BENCH --config configs/bench/resnet18-mnist1d.yaml --profile-json "$OUT/profiles/resnet18-mnist1d/profile.json" --out "$OUT/resnet18-mnist1d" --overwrite
