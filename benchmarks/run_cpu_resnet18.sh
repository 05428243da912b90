#!/usr/bin/env bash
# The measurement behind docs/method-card.md: ResNet-18 (CIFAR stem), synthetic 3x32x32 data, batch 64,
# the paper's LDB settings (p=0.3, every=2, lr and batch x2), 5 epochs of 1024 samples, on the project's
# shared 2-core CPU machine. Each invocation stays under ~8 minutes; runs alternate their order between
# invocations, and --merge pools them (every LDB run is still compared with the baseline of its own
# invocation). Run from the repository root. Takes about an hour on 2 cores.
set -euo pipefail
OUT=${OUT:-outputs/bench-cpu-resnet18}
BENCH="python -m lightning_ldb.bench --no-progress-bar --train-samples 1024"
NOTE="Shared 2-core VM: other engineers' test suites ran concurrently (see the load averages in report.json)."

# Paired runs, in both orders; then the callback installed with no DROP epoch (its overhead), in both orders.
$BENCH --variants baseline,ldb --note "$NOTE" --out "$OUT/d1"
$BENCH --variants ldb,baseline --note "$NOTE" --out "$OUT/d2"
$BENCH --variants baseline,ldb --note "$NOTE" --out "$OUT/d3"
$BENCH --variants ldb,baseline --note "$NOTE" --out "$OUT/d4"
$BENCH --variants callback-only,baseline --note "$NOTE" --out "$OUT/e1"
$BENCH --variants baseline,callback-only --note "$NOTE" --out "$OUT/e2"
# Where the time of a full and a DROP step goes (forward/backward/optimizer, batch 64 vs 128).
$BENCH --profile-only --profile-steps 3 --out "$OUT/profile"
$BENCH --merge "$OUT"/d[1-4]/report.json "$OUT"/e[12]/report.json "$OUT"/profile/profile.json --out "$OUT/merged"

# The ablations, on shorter runs (one baseline per invocation).
$BENCH --sweep batch_scale=1,2 --train-samples 512 --out "$OUT/sweep-batch-scale"
$BENCH --sweep drop_rate=0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8 --train-samples 512 --epochs 3 --out "$OUT/sweep-drop-rate"
$BENCH --sweep every=1,2,3,4 --train-samples 256 --epochs 9 --out "$OUT/sweep-every-1-4"
$BENCH --sweep every=5,6,7,8 --train-samples 256 --epochs 9 --out "$OUT/sweep-every-5-8"
$BENCH --merge "$OUT"/sweep-every-1-4/sweep.json "$OUT"/sweep-every-5-8/sweep.json --out "$OUT/sweep-every"
