#!/usr/bin/env bash
# gpu_suite step: the GUARD training step (issue 17). ResNet-18 at 224 px, batch 128, side by
# side in one process per layout: plain CE, the straightforward form, the exact step, and
# both captured whole in a CUDA graph (ce-graph, exact-graph); fp32 then bf16 +
# channels_last; then 32 px, batch 128 (small kernels: launches weigh most). Every row has
# the step's FLOPs, ops dispatched, TFLOP/s and its fraction of the device's peak; the
# summary pairs the rows (GUARD/CE, GUARD/straightforward, bf16+channels_last vs fp32).
# cap: 200
set -uo pipefail
V=ce,straightforward,exact,ce-graph,exact-graph
if [ "${DEV:-cuda}" = cuda ]; then
  $PY bench/bench_loss.py --device cuda --configs r18-imagenet-224-b128 --dtype fp32 \
    --variants "$V" --results-dir "$OUT"
  $PY bench/bench_loss.py --device cuda --configs r18-imagenet-224-b128 --dtype bf16 \
    --channels-last --variants "$V" --results-dir "$OUT"
  $PY bench/bench_loss.py --device cuda --configs r18-small-32-b128 --dtype fp32 \
    --variants "$V" --results-dir "$OUT"
else
  # CPU smoke: two variants, one timed step each (the graph variants fall back off CUDA)
  $PY bench/bench_loss.py --device cpu --quick --configs r18-imagenet-32-b8 --variants ce,exact \
    --reps 1 --in-process --results-dir "$OUT"
fi
$PY bench/bench_loss.py --summary "$OUT/loss.jsonl" --results-dir "$OUT"
