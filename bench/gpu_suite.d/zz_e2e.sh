#!/usr/bin/env bash
# gpu_suite step (last): the whole driver on a reduced ImageNette-shaped synthetic-JPEG run,
# stage by stage (wall time, images/s).
# cap: 120
set -uo pipefail
if [ "${DEV:-cuda}" = cuda ]; then
  $PY bench/bench_e2e.py --device cuda --results-dir "$OUT"
else
  $PY bench/bench_e2e.py --quick --results-dir "$OUT"
fi
