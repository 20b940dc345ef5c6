#!/usr/bin/env bash
# LL kernels on the GPU machine (nvidia-h200-x2), one call: build, the GPU tests
# (one process for both GPUs and one process per GPU; memory and forced port
# channels), then the benchmark and its token sweep (with plot). Logs and results go to $OUT.
#   STAGES="build test bench sweep" (default all); TESTK="expr" narrows pytest (-k);
#   MARK="slow" runs the long tests instead of the others (default "not slow");
#   BENCH_ARGS are passed to benchmarks/bench_ll.py.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
export JMEP_LL_TEST_TIMEOUT=${JMEP_LL_TEST_TIMEOUT:-240}
export JMEP_LL_LOG_DIR=${JMEP_LL_LOG_DIR:-${OUT:-/tmp/out}/workers}  # live worker logs
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STAGES=${STAGES:-"build test bench sweep"}
REPO=$(pwd)
{
echo "== $(date -u +%T) start; stages: $STAGES"
if [[ $STAGES == *build* ]]; then
  time python3 -m pip install --no-build-isolation -q . 2>&1 | grep -v "^WARNING: Running pip" | tail -30
  (cd /tmp && python3 -c "import jax_mscclpp_ep as e; from jax_mscclpp_ep import native as n; print('cuda', e.cuda_enabled(), [t for t, _ in n.ext.ffi_targets()])")
fi
if [[ $STAGES == *test* ]]; then
  echo "== $(date -u +%T) tests"
  timeout ${TEST_TIMEOUT:-560} pytest -q -rA -p no:cacheprovider -m "${MARK:-not slow}" ${TESTK:+-k "$TESTK"} tests/test_ll_gpu.py > "$OUT/tests.txt" 2>&1
  grep -E "PASS|FAIL|SUMMARY|passed|failed|Error|error" "$OUT/tests.txt" | grep -v "^  File" | head -${TEST_TAIL:-150}
fi
if [[ $STAGES == *bench* ]]; then
  echo "== $(date -u +%T) benchmark"
  timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/bench_ll.py --out "$OUT/ll_h200x2" ${BENCH_ARGS:-}
fi
if [[ $STAGES == *sweep* ]]; then
  echo "== $(date -u +%T) latency vs tokens per rank"
  timeout ${SWEEP_TIMEOUT:-240} python3 benchmarks/bench_ll.py --shapes 128,7168,8,256 \
    --sweep-tokens 1,2,4,8,16,32,64,128 --sweep-only --reps 3 --out "$OUT/ll_sweep_h200x2" \
    --plot "$OUT/ll_sweep_h200x2.png" 2>&1 | tail -14
fi
echo "== $(date -u +%T) done"
} 2>&1 | tee "$OUT/log.txt"
