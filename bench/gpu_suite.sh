#!/usr/bin/env bash
# The one prepared GPU run: build guard_fast._C for this GPU, run the GPU tests, run the
# benches, and leave results (JSON lines) plus a log under OUTDIR. The whole run keeps to
# SUITE_BUDGET_S seconds (default 540): each step gets at most its own cap and never more
# than what is left, most valuable steps first, so a lease of a few minutes always returns
# the build, the test verdict and the first benches. Needs no internet: Python packages
# the machine lacks travel as wheels in .whl/.
#
#   bash bench/gpu_suite.sh OUTDIR
#
# SUITE_STEPS="tests e2e" runs only the named steps (tests, loss, attacks, ops, recover, mtt,
# squeeze, e2e, loss-compiled; the build always runs): a second, shorter lease for what the first cut.
# The GUARD-step measurements (issue 17): SUITE_STEPS="tests loss squeeze loss-compiled".
# BENCH_COMMIT=<hash> labels every result row with that commit (the copy on a lent machine
# may carry a stale .git; send the hash of the code you run).
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
BUDGET=${SUITE_BUDGET_S:-540}
T0=$(date +%s)
step() { echo; echo "=== $* (t=$(( $(date +%s) - T0 ))s)"; }
# cap SECONDS: seconds a step may take, its cap or what is left of the budget (>= 1)
cap() { local left=$(( BUDGET - ($(date +%s) - T0) )); local c=$1
        [ "$left" -lt "$c" ] && c=$left; [ "$c" -lt 1 ] && c=1; echo "$c"; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
STEPS=" ${SUITE_STEPS:-tests loss attacks ops recover squeeze mtt e2e loss-compiled} "
want() { [[ "$STEPS" == *" $1 "* ]]; }

step environment
echo "commit recorded in result rows: ${BENCH_COMMIT:-from git in this copy}"
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
step "build guard_fast._C in place (C++ CPU + CUDA kernels)"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
b0=$(date +%s)
# in place, not pip -e: one compile whatever pip thinks of the environment; the symlink is
# what setup.py's package_dir mapping (kernels/ -> guard_fast.kernels) provides
timeout "$(cap 300)" $PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1
echo "build exit status $? (full output in build.log)"; tail -4 "$OUT/build.log" | cut -c1-300
[ -e guard_fast/kernels ] || ln -sfn ../kernels guard_fast/kernels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
echo "build wall: $(( $(date +%s) - b0 )) s"
fi
$PY -c "import guard_fast as g; print(g.ops.backend_info()); print('cuda tensors use:', g.ops.backend_for('cuda'))"

if [ "$DEV" = cuda ]; then
  if want tests; then
    step "GPU tests (cap $(cap 120) s; full output in gpu_tests.log)"
    timeout "$(cap 120)" $PY -m pytest -q -p no:cacheprovider --tb=short tests/test_attack_kernels.py \
      tests/test_kernels.py tests/test_losses.py tests/test_csrc.py tests/test_step.py \
      tests/test_flops.py -k "cuda or graph" \
      > "$OUT/gpu_tests.log" 2>&1
    grep -E "^(FAILED|ERROR|E  )" "$OUT/gpu_tests.log" | cut -c1-300 | head -40
    tail -3 "$OUT/gpu_tests.log"
  fi
fi

# later areas add their own steps in gpu_suite.d/ (run in name order); each reads CAP, the
# seconds it may take, and is cut by timeout at that
for extra in bench/gpu_suite.d/*.sh; do
  [ -f "$extra" ] || continue
  name=$(basename "$extra" .sh); want "${name#zz_}" || continue
  c=$(grep -m1 -o '^# cap: [0-9]*' "$extra" | grep -o '[0-9]*$'); c=$(cap "${c:-120}")
  if [ "$DEV" = cuda ] && [ "$(left)" -lt 15 ]; then
    step "$extra: skipped, the budget is spent"; continue
  fi
  step "$extra (cap $c s)"
  [ "$DEV" = cuda ] || c=300
  OUT="$OUT" PY="$PY" DEV="$DEV" CAP="$c" timeout "$c" bash "$extra"
done

if [ "$DEV" = cuda ] && want loss-compiled && [ "$(left)" -gt 60 ]; then
  step "bench_loss: compiled variants (one config; what the budget leaves)"
  timeout "$(cap 200)" $PY bench/bench_loss.py --device cuda --configs r18-small-32-b128 --dtype fp32 \
    --variants ce,straightforward,exact,ce-compile-step,exact-compile-step,exact-compiled,fd-compiled \
    --results-dir "$OUT"
fi

step "done"
ls -la "$OUT"
