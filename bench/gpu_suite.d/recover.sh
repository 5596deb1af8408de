#!/usr/bin/env bash
# gpu_suite step: recover iterations/s, guard_fast (grouped, channels_last, compile + bf16)
# vs a public-code-style hooks loop; ResNet-18 at 224 px, 100 images per group on the GPU.
# cap: 100
set -uo pipefail
if [ "${DEV:-cuda}" = cuda ]; then
  $PY bench/bench_recover.py --device cuda --groups 4 --reps 5 \
    --variants "${RECOVER_VARIANTS:-eager,channels_last,bf16}" \
    --results-dir "$OUT"
else
  $PY bench/bench_recover.py --quick --reps 1 --groups 2 --variants eager --image-size 32 \
    --results-dir "$OUT"
fi
