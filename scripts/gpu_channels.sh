#!/usr/bin/env bash
# Channel layer on the GPU machine (nvidia-h200-x2), one call: build, the GPU
# tests in both process modes, then the benchmark. Logs/results go to $OUT.
#   STAGES="build test bench" (default all three)
set -uo pipefail
export NCCL_NVLS_ENABLE=0 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STAGES=${STAGES:-"build test bench"}
{
echo "== $(date -u +%T) start; stages: $STAGES"
if [[ $STAGES == *build* ]]; then
  time python3 -m pip install --no-build-isolation -q . 2>&1 | grep -v "^WARNING: Running pip" | tail -30
  (cd /tmp && python3 -c "from jax_mscclpp_ep import native as n; print('cuda', n.cuda_enabled(), 'gpus', n.ext.device_count())")
fi
if [[ $STAGES == *test* ]]; then
  export JMEP_TIMEOUT_S=${JMEP_TIMEOUT_S:-10}  # fail fast if a check leaves a peer waiting
  echo "== $(date -u +%T) single-process worker"
  timeout ${TEST_TIMEOUT:-240} python3 tests/_channels_worker.py --mode single 2>&1 | tail -80
  echo "== $(date -u +%T) two-process workers"
  PORT=$((20000 + RANDOM % 20000)); SEED=$((RANDOM * 32768 + RANDOM))  # both ranks share the seed
  for r in 0 1; do
    timeout ${TEST_TIMEOUT:-240} python3 tests/_channels_worker.py --mode multi --rank $r --nproc 2 --port $PORT --seed $SEED > "$OUT/multi_rank$r.txt" 2>&1 &
  done
  wait
  tail -40 "$OUT/multi_rank0.txt"; grep -h "SUMMARY\|FAIL" "$OUT/multi_rank1.txt"
fi
if [[ $STAGES == *bench* ]]; then
  echo "== $(date -u +%T) benchmark"
  timeout ${BENCH_TIMEOUT:-180} python3 benchmarks/bench_channels.py --out "$OUT/channels_h200x2"
fi
echo "== $(date -u +%T) done"
} 2>&1 | tee "$OUT/log.txt"
