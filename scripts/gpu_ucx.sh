#!/usr/bin/env bash
# Across hosts on the one-GPU machine (nvidia-h200), one device call: install the
# libucx-cu13 wheel carried in .whl/, build, then processes sharing GPU 0 with their own
# JMEP_HOST_ID talk over UCX (TCP loopback + cuda_copy) as separate hosts would.
#   STAGES="build info smoke conn channels ll long graphs lifecycle dead regress sanitize example bench" (default all but smoke)
#   LLK narrows the simulated-hosts LL pytest (-k); logs go to $OUT.
# Call with carry [".whl"].
set -uo pipefail
export NCCL_NVLS_ENABLE=0 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
export UCX_WARN_UNUSED_ENV_VARS=n
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/workers"
export JMEP_LL_LOG_DIR=$OUT/workers JMEP_LL_TEST_TIMEOUT=${JMEP_LL_TEST_TIMEOUT:-300}
STAGES=${STAGES:-"build info conn channels ll long graphs lifecycle dead regress sanitize example bench"}
PYT="pytest -q -rA -p no:cacheprovider"
# One pytest stage: run_tests LOG TIMEOUT_S PYTEST_ARGS...; output to $OUT/LOG, summary printed.
run_tests() { local log=$1 tmo=$2; shift 2; timeout "$tmo" $PYT "$@" > "$OUT/$log" 2>&1; summary "$OUT/$log"; }
summary() { grep -hE "PASS|FAIL|passed|failed|Error|SUMMARY|rank .* -> peer|channels:" "$@" | grep -v "^  File" | head -${N:-60}; }
{
echo "== $(date -u +%T) start; stages: $STAGES"
nvidia-smi -L
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
if [[ $STAGES == *build* ]]; then
  time JMEP_UCX=ON python3 -m pip install --no-build-isolation -q . 2>&1 | grep -v "^WARNING: Running pip" | tail -30
  (cd /tmp && python3 -c "import jax_mscclpp_ep as e, jax; from jax_mscclpp_ep import ucx; print('jax', jax.__version__, 'cuda', e.cuda_enabled(), 'ucx', ucx.available(), ucx.version())")
fi
if [[ $STAGES == *info* ]]; then
  export LD_LIBRARY_PATH=/tmp/site/libucx/lib:${LD_LIBRARY_PATH:-}  # the image has a UCX 1.16 too
  /tmp/site/libucx/bin/ucx_info -v | head -3
  /tmp/site/libucx/bin/ucx_info -d | grep -E "Transport:|Device:" | paste - - | sort -u | head -20
fi
if [[ $STAGES == *smoke* ]]; then
  echo "== $(date -u +%T) smoke: two simulated hosts on GPU 0, a few LL cases"
  timeout 240 python3 tests/ll_run.py simulated_hosts-2x1 -k "${SMOKE:-peer_channels or basic_bf16 or basic_fp8 or all_remote}" \
    > "$OUT/smoke.txt" 2>&1
  N=30 summary "$OUT/smoke.txt" "$OUT"/workers/simulated_hosts-2x1_*.log
fi
if [[ $STAGES == *conn* ]]; then
  echo "== $(date -u +%T) UCX connection on host memory (the CI tests)"
  run_tests conn.txt 300 tests/test_ucx_connection.py
fi
if [[ $STAGES == *channels* ]]; then
  echo "== $(date -u +%T) channel checks, two simulated hosts on GPU 0 (UCX_LOG_LEVEL=info: transports)"
  UCX_LOG_LEVEL=info timeout 400 $PYT -s tests/test_channels_gpu.py -k simulated > "$OUT/channels_ucx.txt" 2>&1
  N=40 summary "$OUT/channels_ucx.txt"; grep -hiE "ucp_ep|tcp|cuda_copy|lane" "$OUT/channels_ucx.txt" | sort | uniq -c | sort -rn | head -12
fi
if [[ $STAGES == *ll* ]]; then
  echo "== $(date -u +%T) LL cases across simulated hosts (2x1, 2x2)"
  JMEP_UCX_STEPS=${JMEP_UCX_STEPS:-200} timeout 560 $PYT tests/test_ll_gpu.py -k "simulated_hosts-2 ${LLK:+and $LLK}" > "$OUT/ll_hosts.txt" 2>&1
  N=120 summary "$OUT/ll_hosts.txt"
fi
if [[ $STAGES == *long* ]]; then
  echo "== $(date -u +%T) 1,000 steps of fresh routing across simulated hosts"
  run_tests ll_long.txt 400 tests/test_ll_gpu.py -k "simulated_hosts_fresh"
fi
if [[ $STAGES == *graphs* ]]; then
  echo "== $(date -u +%T) CUDA graphs across simulated hosts"
  run_tests ll_graphs.txt 300 tests/test_ll_gpu.py -k "simulated_hosts_cuda_graphs"
fi
if [[ $STAGES == *lifecycle* ]]; then
  echo "== $(date -u +%T) 100 Buffers created/closed and exit without close, across simulated hosts"
  run_tests ll_lifecycle.txt 400 tests/test_ll_gpu.py -k "simulated_hosts_lifecycle"
fi
if [[ $STAGES == *dead* ]]; then
  echo "== $(date -u +%T) killed peer over UCX (and the one-GPU mem/port paths)"
  run_tests ll_dead.txt 300 tests/test_ll_gpu.py -k "dead_peer and one_gpu"
  grep -h "survivor saw" "$OUT"/workers/dead_peer-one_gpu-*_0.log | cut -c1-400
fi
if [[ $STAGES == *regress* ]]; then
  echo "== $(date -u +%T) single-host paths after the proxy refactor"
  run_tests ll_regress.txt 400 tests/test_ll_gpu.py -k "${REGRESSK:-two_processes_one_gpu}"
fi
if [[ $STAGES == *sanitize* ]]; then
  echo "== $(date -u +%T) compute-sanitizer memcheck, two simulated hosts over UCX"
  CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  # API errors off: UCX probes the driver (cuMemCreate, cuPointerGetAttribute on host
  # pointers) and handles the refusals itself; memory access errors are what count here.
  timeout 400 python3 tests/ll_run.py simulated_hosts-2x1 -k "basic_fp8 or dups_and_bad_ids or basic_bf16" \
    --wrap "$CS --tool memcheck --report-api-errors no --error-exitcode 9 --log-file $OUT/memcheck_ucx_{rank}.txt" \
    > "$OUT/memcheck_ucx_worker.txt" 2>&1
  grep -hE "PASS|FAIL|SUMMARY" "$OUT/memcheck_ucx_worker.txt"; for r in 0 1; do tail -2 "$OUT/memcheck_ucx_$r.txt"; done
fi
if [[ $STAGES == *example* ]]; then
  echo "== $(date -u +%T) example: 2 simulated hosts x 2 ranks on GPU 0"
  timeout 300 python3 examples/launch_multiprocess.py --nprocs 4 --gpu --ranks-per-host 2 --same-gpu \
    --tokens 16 --hidden 256 --experts 8 > "$OUT/example_hosts.txt" 2>&1
  grep -hE "channels|OK|FAIL" "$OUT/example_hosts.txt" | head -12
fi
if [[ $STAGES == *bench* ]]; then
  export JMEP_UCX_LIBRARY=$(cd /tmp && python3 -c "from jax_mscclpp_ep import ucx; print(ucx.library_path())")
  echo "== $(date -u +%T) benchmark: memory / CUDA-IPC port / UCX port at R = 2 on GPU 0"
  timeout 400 python3 benchmarks/bench_hosts.py --out "$OUT/hosts_h200x1" ${BENCH_ARGS:-} 2>&1 | tail -40
  timeout 120 python3 benchmarks/bench_ucx.py --signals am --out "$OUT/ucx_conn_h200x1" 2>&1 | tail -30
fi
echo "== $(date -u +%T) done"
} 2>&1 | tee "$OUT/log.txt"
