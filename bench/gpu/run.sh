#!/usr/bin/env bash
# Every GPU check and timing in one call, for the lent device machine:
#   run: bash bench/gpu/run.sh            (PYTHONPATH=. ; nothing is installed there)
# On a CPU it runs the same scripts at CPU sizes, to test this script before a device call.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=.
PY=${PYTHON:-python3}  # the device machine's python3 has jax; here: PYTHON=.venv/bin/python
OUT=${OUT:-/tmp/funtrain-gpu}
mkdir -p "$OUT"
"$PY" - <<'PY'
import jax
print("devices:", jax.devices(), "backend:", jax.default_backend())
PY
GPU_FLAG=""
if "$PY" -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 1)"; then
  GPU_FLAG="--gpu"
fi
status=0
echo "== bench/precision.py $GPU_FLAG"
"$PY" bench/precision.py $GPU_FLAG 2>&1 | tee "$OUT/precision.txt" || status=1
echo "== bench/remat.py $GPU_FLAG"
"$PY" bench/remat.py $GPU_FLAG 2>&1 | tee "$OUT/remat.txt" || status=1
echo "== bench/models.py $GPU_FLAG"
"$PY" bench/models.py $GPU_FLAG 2>&1 | tee "$OUT/models.txt" || status=1
echo "== bench/gpu/attention_check.py"
"$PY" bench/gpu/attention_check.py 2>&1 | tee "$OUT/attention.txt" || status=1
echo "== bench/fit.py $GPU_FLAG"
"$PY" bench/fit.py --repeats ${FIT_REPEATS:-3} $GPU_FLAG 2>&1 | tee "$OUT/fit.txt" || status=1
echo "== bench/optim.py $GPU_FLAG"
if [ -n "$GPU_FLAG" ]; then OPTIM_ARGS="--gpu --only update"; else OPTIM_ARGS="--params 1000000 --leaves 200 --repeats 5"; fi
"$PY" bench/optim.py $OPTIM_ARGS 2>&1 | tee "$OUT/optim.txt" || status=1
echo "== bench/train_step.py"
"$PY" bench/train_step.py 2>&1 | tee "$OUT/train_step.txt" || status=1
exit $status
