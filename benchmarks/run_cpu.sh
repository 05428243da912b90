#!/usr/bin/env bash
# The method card's CPU tables: every invocation side by side, 2 repetitions each, one thread.
# Sizes are kept small so the whole script fits a short session on 2 shared cores; raise --epochs and
# --train-samples on a quiet machine. Usage: bash benchmarks/run_cpu.sh [output folder]
set -euo pipefail
OUT=${1:-benchmarks/results}
BENCH=${BENCH:-ldb-bench}
export OMP_NUM_THREADS=1
time $BENCH --quick --out "$OUT/quick"
$BENCH --model mnist1d-cnn --epochs 6 --out "$OUT/mnist1d-cnn"
$BENCH --model resnet18 --epochs 3 --train-samples 256 --out "$OUT/resnet18"
$BENCH --model resnet18-imagenet-stem --epochs 5 --train-samples 512 --out "$OUT/resnet18-imagenet-stem"
$BENCH --model vit-small --epochs 3 --train-samples 256 --out "$OUT/vit-small"
