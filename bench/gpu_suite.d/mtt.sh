#!/usr/bin/env bash
# gpu_suite step: MTT / TESLA iteration time and peak memory at syn_steps 10, 20, 40 against
# a public-code-style flattened-parameter loop; ConvNet width 128, 32 px, 100 images.
# cap: 60
set -uo pipefail
if [ "${DEV:-cuda}" = cuda ]; then
  $PY bench/bench_mtt.py --device cuda --reps 5 --results-dir "$OUT"
else
  $PY bench/bench_mtt.py --quick --reps 1 --steps 2 --width 8 --image-size 16 \
    --variants mtt,tesla --results-dir "$OUT"
fi
