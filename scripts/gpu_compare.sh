#!/usr/bin/env bash
# benchmarks/bench_ll.py on the code before a change and on this tree, in one device
# call, one after the other on the same GPU. The old code travels as a tarball
# (`git archive -o .whl/base.tar <commit>`; carry [".whl"]); this tree must already be
# installed (e.g. STAGES=build bash scripts/gpu_one.sh). Results: $OUT/bench_{base,new}.*
#   BENCH_ARGS are passed to both runs (default: the memory and port paths, no ragged).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
BASE_TAR=${BASE_TAR:-.whl/base.tar}
ARGS=${BENCH_ARGS:-"--systems mem-fp8,mem-bf16,port-fp8"}
REPO=$(pwd)
rm -rf /tmp/base /tmp/site-base && mkdir -p /tmp/base && tar -xf "$BASE_TAR" -C /tmp/base
echo "== $(date -u +%T) build the base ($(cat /tmp/base/.commit 2>/dev/null || echo "$BASE_TAR"))"
(cd /tmp/base && python3 -m pip install --no-build-isolation --no-deps -q --target /tmp/site-base . 2>&1 \
  | grep -v "^WARNING" | tail -5)
for which in base new; do
  echo "== $(date -u +%T) bench_ll: $which"
  if [[ $which == base ]]; then pp=/tmp/site-base; bench=/tmp/base/benchmarks/bench_ll.py
  else pp=""; bench=$REPO/benchmarks/bench_ll.py; fi
  (cd /tmp && PYTHONPATH=$pp timeout ${BENCH_TIMEOUT:-240} python3 "$bench" $ARGS --out "$OUT/bench_$which" 2>&1 | tail -16)
done
echo "== $(date -u +%T) done"
