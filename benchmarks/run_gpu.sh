#!/usr/bin/env bash
# The GPU presets on one GPU, as one script: ResNet-50 from scratch (CIFAR shapes) and ViT-B/16 (224x224),
# each profiled (the ceiling, a minute) and then run with baseline, ldb, batch-only and ldb-block, 3
# repetitions, bf16-mixed, CUDA-synchronised epoch clock. Sized to finish within about 12 minutes on one
# H100/H200 (an estimate: not yet run on a GPU). Usage: bash benchmarks/run_gpu.sh [output folder]
set -euo pipefail
OUT=${1:-benchmarks/results/gpu}
BENCH=${BENCH:-ldb-bench}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
for preset in gpu-resnet50 gpu-vit-b16; do
  $BENCH --config "configs/bench/$preset.yaml" --profile --out "$OUT/$preset" --overwrite
  # The profile just measured bounds the comparison's verdicts (--profile-json), written beside it.
  time $BENCH --config "configs/bench/$preset.yaml" --profile-json "$OUT/$preset/profile.json" --out "$OUT/$preset" --overwrite
done
