#!/usr/bin/env bash
# Everything that one GPU can show, in one device call (nvidia-h200 or
# nvidia-h100-x1): build; channel layer with both ranks on GPU 0 (one process,
# then two processes); LL kernels at R = 1 and as two processes sharing GPU 0;
# GPU gradients; the single-GPU benchmark. Logs go to $OUT.
#   STAGES="build channels ll grad bench" (default all); TESTK narrows the LL pytest.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export JMEP_LL_LOG_DIR=$OUT/workers JMEP_LL_TEST_TIMEOUT=${JMEP_LL_TEST_TIMEOUT:-200}
STAGES=${STAGES:-"build channels ll grad sanitize bench overlap"}
{
echo "== $(date -u +%T) start; stages: $STAGES"
nvidia-smi -L
if [[ $STAGES == *build* ]]; then
  time python3 -m pip install --no-build-isolation -q . 2>&1 | grep -v "^WARNING: Running pip" | tail -30
  (cd /tmp && python3 -c "import jax_mscclpp_ep as e, jax; from jax_mscclpp_ep import native as n; print('jax', jax.__version__, 'cuda', e.cuda_enabled(), 'targets', [t for t, _ in n.ext.ffi_targets()])")
  so=$(cd /tmp && python3 -c "import jax_mscclpp_ep.native as n; print(n.ext.__file__)" 2>/dev/null); [[ -n "$so" ]] && { ldd "$so" | grep -E "stdc|cuda" || echo "no libstdc++/libcuda dependency listed"; }
fi
if [[ $STAGES == *channels* ]]; then
  export JMEP_TIMEOUT_S=10
  echo "== $(date -u +%T) channels: one process, ranks 0 and 1 both on GPU 0"
  timeout ${CHAN_TIMEOUT:-150} python3 tests/_channels_worker.py --mode single --devices 0,0 2>&1 | grep -E "PASS|FAIL|SUMMARY|Error|timeout message" | head -40
  echo "== $(date -u +%T) channels: two processes sharing GPU 0"
  PORT=$((20000 + RANDOM % 20000)); SEED=$((RANDOM * 32768 + RANDOM))
  for r in 0 1; do
    timeout ${CHAN_TIMEOUT:-150} python3 tests/_channels_worker.py --mode multi --rank $r --nproc 2 --devices 0,0 --port $PORT --seed $SEED > "$OUT/chan_multi_rank$r.txt" 2>&1 &
  done
  wait
  grep -hE "PASS|FAIL|SUMMARY|timeout message" "$OUT/chan_multi_rank0.txt" | head -30; grep -h "SUMMARY\|FAIL" "$OUT/chan_multi_rank1.txt"
  unset JMEP_TIMEOUT_S
fi
if [[ $STAGES == *ll* ]]; then
  echo "== $(date -u +%T) LL tests on one GPU"
  timeout ${LL_TIMEOUT:-420} pytest -q -rA -p no:cacheprovider -m "${MARK:-not slow}" -k "${TESTK:-one_gpu or one_rank or size_hint}" tests/test_ll_gpu.py > "$OUT/ll_tests.txt" 2>&1
  grep -hE "PASS|FAIL|passed|failed|Error" "$OUT/ll_tests.txt" | grep -v "^  File" | head -80
fi
if [[ $STAGES == *grad* ]]; then
  echo "== $(date -u +%T) GPU gradients, MoE layer, examples"
  timeout ${GRAD_TIMEOUT:-200} pytest -q -rA -p no:cacheprovider -m gpu tests/test_gpu_one.py > "$OUT/grad_tests.txt" 2>&1
  grep -hE "PASS|FAIL|passed|failed|Error" "$OUT/grad_tests.txt" | head -40
fi
if [[ $STAGES == *sanitize* ]]; then
  echo "== $(date -u +%T) compute-sanitizer memcheck: out-of-range expert ids, R = 1"
  CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  if [[ -n "$CS" ]]; then
    # One process, R = 1 (the configuration sets CUDA_VISIBLE_DEVICES=0), its pytest under memcheck.
    timeout ${SAN_TIMEOUT:-240} python3 tests/ll_run.py one_gpu_one_rank-mem -k "dups_and_bad_ids or basic_fp8" \
      --wrap "$CS --tool memcheck --error-exitcode 9 --log-file $OUT/memcheck.txt" > "$OUT/memcheck_worker.txt" 2>&1
    echo "memcheck exit $?"; grep -E "PASS|FAIL|SUMMARY" "$OUT/memcheck_worker.txt"; tail -3 "$OUT/memcheck.txt"
  else
    echo "no compute-sanitizer on this machine"
  fi
fi
if [[ $STAGES == *bench* ]]; then
  echo "== $(date -u +%T) benchmark (one GPU, R = 1)"
  timeout ${BENCH_TIMEOUT:-200} python3 benchmarks/bench_ll.py --out "$OUT/ll_one_gpu" ${BENCH_ARGS:-} 2>&1 | tail -40
fi
if [[ $STAGES == *overlap* ]]; then
  echo "== $(date -u +%T) two micro-batches: whole calls vs split halves"
  timeout ${OVERLAP_TIMEOUT:-200} python3 benchmarks/bench_overlap.py --out "$OUT/overlap_one_gpu" 2>&1 | tail -5
fi
echo "== $(date -u +%T) done"
} 2>&1 | tee "$OUT/log.txt"
