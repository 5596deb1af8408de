#!/usr/bin/env bash
# gpu_suite step: squeeze throughput per regularizer vs plain CE, and data loading (DALI where
# installed) vs torchvision, timed alone; then the GUARD teacher vs plain CE at batch 128 with
# the step captured whole in a CUDA graph, bf16 and channels_last, beside the loader alone
# (loader_vs_step rows: > 1 means the loader is not the bottleneck).
# cap: 90
set -uo pipefail
if [ "${DEV:-cuda}" = cuda ]; then
  $PY bench/bench_squeeze.py --device cuda --loader-images 1000 --results-dir "$OUT"
  $PY bench/bench_squeeze.py --device cuda --regularizers none,guard --batch 128 --step-mode graph \
    --amp bf16 --channels-last --loader-images 1000 --results-dir "$OUT"
else
  $PY bench/bench_squeeze.py --quick --batch 8 --reps 1 --loader-images 64 --results-dir "$OUT"
fi
