#!/usr/bin/env bash
# Every GPU check and timing in one call, for the lent device machine:
#   run: bash bench/gpu/run.sh            (PYTHONPATH=. ; nothing is installed there)
# On a CPU it runs the same scripts at CPU sizes, to test this script before a device call.
# Each script has its own time limit (seconds, scaled by LIMIT_SCALE) so that one slow
# script cannot starve the rest; the most wanted figures run first. ONLY="remat fit" runs
# those alone.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # torch shares the card in bench/optim.py
PY=${PYTHON:-python3}  # the device machine's python3 has jax; here: PYTHON=.venv/bin/python
OUT=${OUT:-/tmp/funtrain-gpu}
SCALE=${LIMIT_SCALE:-1}
mkdir -p "$OUT"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import jax, sys; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices(), jax.default_backend())"
} 2>&1 | tee "$OUT/env.txt"
GPU_FLAG=""
if "$PY" -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 1)"; then
  GPU_FLAG="--gpu"
fi
status=0
step() {  # step NAME LIMIT_S CMD...: run one script, its output in $OUT/NAME.txt
  local name=$1 limit=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  echo "== $name: $* (limit $((limit * SCALE)) s)"
  local t0=$SECONDS
  timeout "$((limit * SCALE))" "$@" 2>&1 | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "== $name: rc $rc in $((SECONDS - t0)) s" | tee -a "$OUT/$name.txt"
  [ "$rc" = 0 ] || status=1
}
if [ -n "$GPU_FLAG" ]; then OPTIM_ARGS="--gpu --only update"; else OPTIM_ARGS="--params 1000000 --leaves 200 --repeats 5"; fi
step optim 120 "$PY" bench/optim.py $OPTIM_ARGS
step fit 90 "$PY" bench/fit.py --repeats "${FIT_REPEATS:-3}" --workloads ${FIT_WORKLOADS:-A B} $GPU_FLAG
step remat ${REMAT_LIMIT:-150} "$PY" bench/remat.py $GPU_FLAG
step precision 60 "$PY" bench/precision.py $GPU_FLAG
step models 50 "$PY" bench/models.py $GPU_FLAG
step attention 30 "$PY" bench/gpu/attention_check.py
step train_step 40 "$PY" bench/train_step.py
exit $status
