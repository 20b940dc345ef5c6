#!/usr/bin/env bash
# Issue 14's before/after in one device call: builds the base commit (carry .whl with
# `git archive -o .whl/base.tar REV` + .whl/base.commit) and this tree, each also with
# the phase probes compiled in, then on the same GPU: bench_latency (CUPTI medians +
# %globaltimer, T sweep), phase_probes at T = 1 and 128, ncu at T = 1 and 128.
#   STAGES="build test bench probes ncu" (default all; "build" builds what the others
#   need); ARCHS (default 90-real). "new" is installed for the tests too.
#   OLDER="start" also benchmarks .whl/start.tar (+ .whl/start.commit), e.g. the
#   commit before the work, as label "start".
#   VARIANTS="r12:-DJMEP_LL_COPY_ROUND=12 ..." also builds this tree with those CUDA
#   flags as variant new-r12 (benchmarked after "new", label after-r12).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
export JMEP_CUDA_ARCHS=${ARCHS:-90-real}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STAGES=${STAGES:-"build test sanitize bench probes ncu"}
REPO=$(pwd)
site() { [[ $1 == new ]] && echo "" || echo /tmp/site-$1; }  # new: the installed package
{
echo "== $(date -u +%T) start; stages: $STAGES"; nvidia-smi -L
if [[ $STAGES == *build* ]]; then
  for b in base ${OLDER:-}; do
    rm -rf /tmp/$b && mkdir -p /tmp/$b && tar -xf .whl/$b.tar -C /tmp/$b
    echo "$b: $(cat .whl/$b.commit 2>/dev/null)"
  done
  want="new"; [[ $STAGES == *bench* || $STAGES == *ncu* ]] && want="$want base ${OLDER:-}"
  [[ $STAGES == *probes* ]] && want="$want base-probes new-probes"
  for vf in ${VARIANTS:-}; do want="$want new-${vf%%:*}"; done
  for v in $want; do
    src=$REPO; [[ $v != new* ]] && src=/tmp/${v%-probes}
    flags=""; [[ $v == *probes ]] && flags="-DCMAKE_CUDA_FLAGS=-DJMEP_LL_PROBES"
    for vf in ${VARIANTS:-}; do [[ $v == new-${vf%%:*} ]] && flags="-DCMAKE_CUDA_FLAGS=${vf#*:}"; done
    target=""; [[ $v != new ]] && { rm -rf "$(site $v)"; target="--target $(site $v)"; }
    rm -rf "$src/build"
    (cd "$src" && CMAKE_ARGS="$flags" python3 -m pip install --no-build-isolation --no-deps -q \
      $target . 2>&1 | grep -v "^WARNING" | tail -5)
    echo "== $(date -u +%T) built $v"
  done
fi
if [[ $STAGES == *test* ]]; then
  echo "== $(date -u +%T) LL tests on one GPU: ${TESTK:=one_gpu_one_rank or two_processes_one_gpu}"
  JMEP_LL_LOG_DIR=$OUT/workers JMEP_LL_TEST_TIMEOUT=240 timeout ${LL_TIMEOUT:-300} pytest -q -rA \
    -p no:cacheprovider -m "not slow" -k "$TESTK" tests/test_ll_gpu.py > "$OUT/ll_tests.txt" 2>&1
  grep -hE "FAIL|passed|failed|Error" "$OUT/ll_tests.txt" | grep -v "^  File" | head -40
fi
if [[ $STAGES == *sanitize* ]]; then
  CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  for tool in ${SAN_TOOLS:-memcheck racecheck}; do
    for cfg in ${SAN_CFGS:-one_gpu_one_rank-mem one_gpu_one_rank-port}; do
      echo "== $(date -u +%T) compute-sanitizer $tool: $cfg"
      for v in ${SAN_V:-new}; do  # SAN_V="base new": base's build too (PYTHONPATH)
        tag=${tool}_${cfg}_$v
        PYTHONPATH=$(site $v) JMEP_LL_LOG_DIR=$OUT/san_$tag timeout 200 python3 tests/ll_run.py $cfg \
          -k "${SANK:-basic_fp8 or dups_and_bad_ids or t_less_than_m or split_halves}" \
          --wrap "$CS --tool $tool --error-exitcode 9 --log-file $OUT/$tag.txt" > "$OUT/${tag}_worker.txt" 2>&1
        echo "$v exit $?"; grep -hE "passed|failed" "$OUT/${tag}_worker.txt" | tail -2
        tail -2 "$OUT/$tag.txt"
        grep -h -B2 -A12 "Fatal Python\|Segmentation" "$OUT"/san_$tag/*.log 2>/dev/null | head -40
      done
    done
  done
fi
if [[ $STAGES == *bench* ]]; then
  for v in ${OLDER:-} base new $(for vf in ${VARIANTS:-}; do echo new-${vf%%:*}; done); do
    echo "== $(date -u +%T) bench_latency: $v"
    label=before; [[ $v == new* ]] && label=after${v#new}; [[ $v == start ]] && label=start
    (cd /tmp && PYTHONPATH=$(site $v) timeout 280 python3 "$REPO/benchmarks/bench_latency.py" \
      --label $label --out "$OUT/latency_$label" 2>&1 | tail -12)
  done
fi
if [[ $STAGES == *probes* ]]; then
  for v in base new; do
    echo "== $(date -u +%T) phase probes: $v"
    (cd /tmp && PYTHONPATH=$(site $v-probes) timeout 120 python3 "$REPO/benchmarks/phase_probes.py" \
      --shapes "${PROBE_SHAPES:-1,7168,8,256,128;128,7168,8,256,128}" 2>&1 | tail -14)
  done
fi
if [[ $STAGES == *ncu* ]]; then
  NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  for v in ${NCU_V:-base new}; do
    for t in 1 128; do
      echo "== $(date -u +%T) ncu: $v T=$t"
      (cd /tmp && PYTHONPATH=$(site $v) timeout 150 "$NCU" -k regex:ll_ --launch-skip 16 --launch-count 2 \
        --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
        python3 "$REPO/benchmarks/ncu_ll.py" --tokens $t > "$OUT/ncu_${v}_T$t.txt" 2>&1)
      grep -E "ll_(dispatch|combine)_kernel|Duration|Registers Per|Warp Cycles Per Issued|Memory Throughput|Achieved Occupancy" \
        "$OUT/ncu_${v}_T$t.txt" | head -24
    done
  done
fi
echo "== $(date -u +%T) done"
} 2>&1 | tee "$OUT/log.txt"
# `run` brings back only a limited number of files: the rank and sanitizer logs travel as one archive.
# (nullglob: no san_* is not an error, so the script's status is the runs'.)
(cd "$OUT" && shopt -s nullglob && logs=(workers san_*) && if ((${#logs[@]})); then tar -czf logs.tgz "${logs[@]}" && rm -rf "${logs[@]}"; fi)
