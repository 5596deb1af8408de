#!/usr/bin/env bash
# The one prepared GPU run: build guard_fast._C for this GPU, run the GPU tests, run the
# benches, and leave results (JSON lines) plus a log under OUTDIR. Sized for < 8 minutes on
# one H100. Needs no internet: Python packages the machine lacks travel as wheels in .whl/.
#
#   bash bench/gpu_suite.sh OUTDIR
#
# SUITE_DEVICE=cpu runs the same steps in a small form on a CPU-only machine (a smoke test of
# this script; tests/test_gpu_suite.py does that).
set -uo pipefail
OUT=$(realpath -m "${1:?usage: bash bench/gpu_suite.sh OUTDIR}")
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
exec > >(tee "$OUT/gpu_suite.log") 2>&1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEV=${SUITE_DEVICE:-cuda}
T0=$(date +%s)
step() { echo; echo "=== $* (t=$(( $(date +%s) - T0 ))s)"; }

step environment
if [ "$DEV" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
fi
$PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| cuda', torch.version.cuda, '| triton', triton.__version__, '|', \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

if compgen -G ".whl/*.whl" > /dev/null; then
  step "wheels carried in .whl/"
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/gf_site .whl/*.whl \
    && export PYTHONPATH=/tmp/gf_site${PYTHONPATH:+:$PYTHONPATH}
fi

if [ "$DEV" = cuda ]; then
step "build guard_fast._C (C++ CPU + CUDA kernels)"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-8}
b0=$(date +%s)
if ! $PY -m pip install -q --no-build-isolation --no-deps --no-index -e . ; then
  echo "editable install failed; building in place instead"
  $PY setup.py -q build_ext --inplace || { echo "BUILD FAILED"; exit 1; }
  ln -sfn ../kernels guard_fast/kernels   # what setup.py's package_dir mapping provides
fi
echo "build wall: $(( $(date +%s) - b0 )) s"
fi
$PY -c "import guard_fast as g; print(g.ops.backend_info()); print('cuda tensors use:', g.ops.backend_for('cuda'))"

if [ "$DEV" = cuda ]; then
  step "GPU tests"
  timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_losses.py \
    tests/test_csrc.py -k "cuda" 2>&1 | tail -25

  step "bench_loss: every config, fp32 and bf16"
  timeout 300 $PY bench/bench_loss.py --device cuda --results-dir "$OUT"

  step "bench_loss: compiled variants (one config)"
  timeout 200 $PY bench/bench_loss.py --device cuda --configs r18-small-32-b128 --dtype fp32 \
    --variants ce,straightforward,exact,exact-compiled,fd-compiled --results-dir "$OUT"
else
  step "bench_loss (smoke, CPU)"
  timeout 300 $PY bench/bench_loss.py --device cpu --quick --variants ce,exact --reps 1 \
    --results-dir "$OUT"
fi

for extra in bench/gpu_suite.d/*.sh; do   # later areas add their own steps here
  [ -f "$extra" ] || continue
  step "$extra"
  OUT="$OUT" PY="$PY" DEV="$DEV" timeout 300 bash "$extra"
done

step "done"
ls -la "$OUT"
