#!/usr/bin/env bash
# gpu_suite step: squeeze throughput per regularizer vs plain CE, and data loading (DALI where
# installed) vs torchvision.
# cap: 50
set -uo pipefail
if [ "${DEV:-cuda}" = cuda ]; then
  $PY bench/bench_squeeze.py --device cuda --loader-images 1000 --results-dir "$OUT"
else
  $PY bench/bench_squeeze.py --quick --loader-images 100 --results-dir "$OUT"
fi
