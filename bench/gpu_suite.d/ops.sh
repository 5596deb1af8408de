#!/usr/bin/env bash
# gpu_suite step: the core GUARD-loss ops (perturb, sqdiff_norm and its backward) by backend
# (reference, CUDA extension, Triton, registered op), to choose the registry's default.
# cap: 60
set -uo pipefail
if [ "${DEV:-cuda}" = cuda ]; then
  $PY bench/bench_ops.py --device cuda --results-dir "$OUT"
else
  $PY bench/bench_ops.py --quick --results-dir "$OUT"
fi
