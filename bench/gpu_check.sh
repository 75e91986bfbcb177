#!/usr/bin/env bash
# The GPU check, one command from the repo root:  bash bench/gpu_check.sh
#   1. a venv whose torch is the machine's CUDA torch (made once), the dependencies, the CUDA extension
#   2. the whole test suite on the GPU (no Triton interpreter; the @pytest.mark.gpu tests, bf16 included)
#   3. `make bench`, which writes bench/results/<date>-<gpu>.md
#   4. a summary
# It ends well inside 10 minutes on an H100: each step has a time limit inside GPU_CHECK_BUDGET (570 s).
#
# Environment: PYTHON (a python with a CUDA torch; default: the first of python3, python that has one),
# VENV (default .venv, or .venv-gpu when .venv holds a CPU-only torch), SAG_FAST_CUDA_ARCHS (default: this
# GPU's, e.g. 90), GPU_CHECK_BUDGET (seconds, default 570), SAG_FAST_OFFLINE=1/0 (default 1: nothing is
# downloaded, pip and the Hugging Face libraries are told so; 0 lets bootstrap install requirements.txt),
# GPU_CHECK_WORKERS (pytest-xdist workers for the tests where xdist is installed, default 8; 0: serial).
# Offline machines (no package index): put the missing wheels in .whl/ first, e.g. on a machine with network
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1
# they are installed with --no-deps, and packages the machine already has are used at their own versions.
# On this workplace's device machine (python3 is a CUDA torch in /opt/torch/.venv, no diffusers, no network):
#   run(command="bash bench/gpu_check.sh", carry=[".whl"])
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET:-570}
LOGDIR=${GPU_CHECK_LOGS:-build/gpu_check}
mkdir -p "$LOGDIR"
log() { echo "[gpu_check +$((SECONDS - START))s] $*"; }
die() { echo "[gpu_check] FAILED: $*" >&2; exit 2; }
left() { echo $((BUDGET - (SECONDS - START))); }

# ------------------------------------------------------------------ 1. python, venv, dependencies, build
cuda_ok='import sys, torch; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)'
PY=""
for c in ${PYTHON:-} python3 python; do
  if command -v "$c" >/dev/null 2>&1 && "$c" -c "$cuda_ok" 2>/dev/null; then PY=$(command -v "$c"); break; fi
done
[ -n "$PY" ] || { nvidia-smi 2>&1 | head -15; die "no python here has a torch that sees a CUDA GPU (set PYTHON=...)"; }
log "python with CUDA torch: $PY ($("$PY" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0))'))"

if [ -z "${VENV:-}" ]; then
  VENV=.venv
  if [ -x .venv/bin/python ] && ! .venv/bin/python -c "$cuda_ok" 2>/dev/null; then
    VENV=.venv-gpu
    log ".venv has a torch without CUDA (made on a CPU machine): using $VENV"
  fi
fi
export VENV
VPY="$VENV/bin/python"
export VPY
if [ ! -x "$VPY" ]; then
  log "creating $VENV on top of $PY's packages"
  if ! "$PY" -m venv --system-site-packages "$VENV" 2>"$LOGDIR/venv.log"; then
    # e.g. Debian/Ubuntu's python without python3-venv (no ensurepip): pip then comes from $PY's packages
    log "python -m venv failed ($(tail -1 "$LOGDIR/venv.log")): retrying with --without-pip"
    rm -rf "$VENV"
    "$PY" -m venv --system-site-packages --without-pip "$VENV" || die "python -m venv $VENV (log: $LOGDIR/venv.log)"
  fi
  echo '*' > "$VENV/.gitignore"  # a venv that git ignores wherever it is made
  # When $PY itself lives in a venv (e.g. /opt/torch/.venv), --system-site-packages reaches only its base
  # interpreter: point the new venv at $PY's own site-packages, after the venv's own.
  if ! "$VPY" -c "import torch, pip" 2>/dev/null; then
    purelib=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    "$PY" -c "import site, sys; print('\n'.join(site.getsitepackages() + [site.getusersitepackages()]))" \
      > "$purelib/_sag_fast_system_torch.pth"
  fi
fi
"$VPY" -c "$cuda_ok" || die "$VPY does not see a CUDA torch"

if [ -z "${SAG_FAST_CUDA_ARCHS:-}" ]; then
  SAG_FAST_CUDA_ARCHS=$("$VPY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability(0))")
fi
export SAG_FAST_CUDA_ARCHS  # one architecture: half the nvcc time of the default "80;90"
export SAG_FAST_NINJA=${SAG_FAST_NINJA:-1}  # setup.py: compile the extension's sources in parallel

SAG_FAST_OFFLINE=${SAG_FAST_OFFLINE:-1}
if [ "$SAG_FAST_OFFLINE" = 1 ]; then  # nothing may reach for the network (it may hang, or change the torch)
  export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
fi
"$VPY" -m pip --version >/dev/null 2>&1 || die "$VPY has no pip (bootstrap builds the extension with it)"
stamp="$VENV/.deps-$(cksum requirements.txt | cut -d' ' -f1)"  # the stamp scripts/bootstrap.sh looks for
if [ "$SAG_FAST_OFFLINE" = 1 ] && [ ! -f "$stamp" ]; then
  log "offline: wheels from .whl/ (if any), then the packages already installed"
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$VPY" -m pip install -q --no-index --no-deps --no-cache-dir .whl/*.whl || die "installing .whl/*.whl"
  fi
  missing=$("$VPY" -c "
import importlib.util as u
need = ['diffusers', 'transformers', 'pytest', 'pytest_benchmark', 'tqdm', 'PIL', 'triton', 'setuptools']
print(' '.join(m for m in need if u.find_spec(m) is None))")
  [ -z "$missing" ] || die "offline and missing: $missing. Put their wheels in .whl/ (see the top of this script)"
  touch "$stamp"  # requirements satisfied by what is here: bootstrap must not reach for the index
fi
log "setup: scripts/bootstrap.sh (dependencies, CUDA extension for sm_$SAG_FAST_CUDA_ARCHS)"
timeout "$(left)" bash scripts/bootstrap.sh 2>&1 | tee "$LOGDIR/setup.log"
[ "${PIPESTATUS[0]}" = 0 ] || die "scripts/bootstrap.sh (log: $LOGDIR/setup.log)"
ext=$("$VPY" -c "import sag_fast; print('cuda' if sag_fast.extension_has_cuda() else 'cpu' if sag_fast.extension_available() else 'none')")
[ "$ext" = cuda ] || log "WARNING: sag_fast._C has no CUDA kernels ($ext): is nvcc on PATH / CUDA_HOME set?"
log "versions: $("$VPY" -c "
import torch, triton, diffusers, transformers
print(f'torch {torch.__version__}, triton {triton.__version__}, diffusers {diffusers.__version__}, '
      f'transformers {transformers.__version__}')")"

PYTEST_ARGS="-q"
workers=${GPU_CHECK_WORKERS:-8}
if [ "$workers" -gt 0 ] && "$VPY" -c "import xdist" 2>/dev/null; then
  PYTEST_ARGS="-q -n $workers"  # ~750 tests, many compiling Triton/inductor kernels: serial would not fit
fi
export PYTEST_ARGS
if command -v make >/dev/null 2>&1; then
  run_test() { make --no-print-directory test VENV="$VENV" PYTEST_ARGS="$PYTEST_ARGS"; }
  run_bench() { make --no-print-directory bench VENV="$VENV"; }
else  # the Makefile's recipes, spelled out
  run_test() { TRITON_INTERPRET=0 "$VPY" -m pytest tests $PYTEST_ARGS; }
  run_bench() { TRITON_INTERPRET=0 "$VPY" -m sag_fast bench; }
fi

# ------------------------------------------------------------------ 2. tests on the GPU
test_limit=$(( $(left) * 55 / 100 ))
[ "$test_limit" -gt 0 ] || test_limit=1  # (timeout 0 would mean no limit at all)
log "tests: make test PYTEST_ARGS='$PYTEST_ARGS' (limit ${test_limit}s)"
timeout "$test_limit" bash -c "$(declare -f run_test); run_test" 2>&1 | tee "$LOGDIR/test.log"
test_rc=${PIPESTATUS[0]}
test_line=$(grep -E "^(=+ )?[0-9]+ (passed|failed|error)" "$LOGDIR/test.log" | tail -1 | tr -d '=')
gpu_skips=$(grep -c "needs a CUDA GPU" "$LOGDIR/test.log" || true)

# ------------------------------------------------------------------ 3. benchmarks
bench_limit=$(( $(left) - 15 ))
if [ "$bench_limit" -lt 60 ]; then  # (timeout 0 would mean no limit at all)
  log "bench: skipped, ${bench_limit}s left"
  echo "bench: skipped, no time left" > "$LOGDIR/bench.log"
  bench_rc=124
else
  log "bench: make bench (limit ${bench_limit}s)"
  export SAG_FAST_BENCH_BUDGET=$(( bench_limit - 20 ))  # bench/run.py shares it between its parts
  timeout "$bench_limit" bash -c "$(declare -f run_bench); run_bench" 2>&1 | tee "$LOGDIR/bench.log"
  bench_rc=${PIPESTATUS[0]}
fi
result=$(grep -E "^bench: wrote " "$LOGDIR/bench.log" | tail -1 | sed 's/^bench: wrote //')

# ------------------------------------------------------------------ 4. summary
echo
echo "================================ gpu_check summary ================================"
echo "GPU:        $("$VPY" -c 'import torch; print(torch.cuda.get_device_name(0))') (sm_$SAG_FAST_CUDA_ARCHS), extension: $ext"
echo "tests:      ${test_line:-no pytest summary line} (exit $test_rc$([ "$test_rc" = 124 ] && echo ', TIME LIMIT'))"
[ "$gpu_skips" = 0 ] || echo "            WARNING: $gpu_skips lines say a GPU test was skipped for want of a GPU"
echo "bench:      exit $bench_rc$([ "$bench_rc" = 124 ] && echo ', TIME LIMIT'), results: ${result:-none written}"
if [ -n "$result" ] && [ -f "$result" ]; then
  sed -n '/^SAG overhead/,$p' "$result" | sed 's/^/            /'
fi
echo "logs:       $LOGDIR/{setup,test,bench}.log"
echo "time:       $((SECONDS - START)) s"
[ "$test_rc" = 0 ] && [ "$bench_rc" = 0 ] && [ "$ext" = cuda ]
