#!/usr/bin/env bash
# Issue 17 on the one-GPU machine, one device call (carry [".whl"] with the
# libucx-cu13 wheel): build, then the rank-mask cases with 4 processes sharing
# GPU 0 (user masks; a rank SIGKILLed mid-loop over memory channels, forced port
# channels and UCX between two simulated hosts), then regressions of the
# unmasked paths (dead peer over UCX, LL cases at R = 1).
#   CFGS (default all mask configurations), REGRESS (LL configs after them; REGRESS=""
#   runs none), EXAMPLE=0 skips examples/decode_survive_kill.py (4 processes on GPU 0, the
#   last one SIGKILLs itself mid-loop: right after enqueuing a step, then after one).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++ JMEP_CUDA_ARCHS=${ARCHS:-90-real}
export UCX_WARN_UNUSED_ENV_VARS=n
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/workers"; REPO=$(pwd)
export JMEP_LL_LOG_DIR=$OUT/workers JMEP_LL_TEST_TIMEOUT=${JMEP_LL_TEST_TIMEOUT:-240}
CFGS=${CFGS-"mask_user-one_gpu-mem mask_user-one_gpu-port mask_lost_rank-one_gpu-mem mask_lost_rank-one_gpu-port mask_lost_rank-one_gpu-ucx"}
REGRESS=${REGRESS-"dead_peer-one_gpu-ucx dead_peer-one_gpu-mem one_gpu_one_rank-mem"}
{
echo "== $(date -u +%T) start"; nvidia-smi -L
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
JMEP_UCX=ON python3 -m pip install --no-build-isolation -q . 2>&1 | grep -v "^WARNING: Running pip" | tail -5
echo "== $(date -u +%T) built"
for cfg in $CFGS $REGRESS; do
  echo "== $(date -u +%T) $cfg"
  timeout ${CFG_TIMEOUT:-280} python3 tests/ll_run.py $cfg > "$OUT/$cfg.txt" 2>&1
  echo "exit $?"
  grep -hE "PASS|FAIL|SUMMARY|survivor|masked|detect" "$OUT/$cfg.txt" "$OUT"/workers/${cfg}_*.log 2>/dev/null \
    | grep -v "^  File" | head -${N:-16}
  # pytest's failure lines (">" the failing line, "E" its message) with the file they are in:
  # the rank logs themselves may not all come back from the machine.
  grep -HE "^>|^E  " "$OUT"/workers/${cfg}_*.log 2>/dev/null | cut -c1-400 | head -${NE:-24}
done
if [[ ${EXAMPLE:-1} == 1 ]]; then  # the decode loop that keeps serving after a kill
  # The lost rank dies mid-step (as a rule), then once its step has finished.
  for when in enqueued finished; do
    echo "== $(date -u +%T) examples/decode_survive_kill.py: 4 processes on GPU 0, killed when $when"
    (cd /tmp && timeout 200 python3 "$REPO/examples/decode_survive_kill.py" --nprocs 4 --gpu \
      --share-gpu --kill-when $when > "$OUT/decode_survive_kill_$when.txt" 2>&1; echo "exit $?")
    grep -E "OK|FAIL|SIGKILL|window|step (3|4|5|6|11):" "$OUT/decode_survive_kill_$when.txt" \
      | cut -c1-260 | head -30
  done
fi
echo "== $(date -u +%T) done"
} 2>&1 | tee "$OUT/log.txt"
# `run` brings back only a limited number of files: the rank and sanitizer logs travel as one archive.
# (nullglob: no san_* is not an error, so the script's status is the runs'.)
(cd "$OUT" && shopt -s nullglob && logs=(workers san_*) && if ((${#logs[@]})); then tar -czf logs.tgz "${logs[@]}" && rm -rf "${logs[@]}"; fi)
