#!/usr/bin/env bash
# Issue 14's before/after in one device call: builds the base commit (carry .whl with
# `git archive -o .whl/base.tar REV` + .whl/base.commit) and this tree, each also with
# the phase probes compiled in, then on the same GPU: bench_latency (CUPTI medians +
# %globaltimer, T sweep), phase_probes at T = 1 and 128, ncu at T = 1 and 128.
#   STAGES="build test bench probes ncu dram" (default all but dram; "build" builds
#   what the others need, in parallel); ARCHS (default 90-real); PASSES=2 benches
#   twice, the second pass in the opposite order. "new" is installed for the tests too.
#   OLDER="start" also benchmarks .whl/start.tar (+ .whl/start.commit), e.g. the
#   commit before the work, as label "start".
#   VARIANTS="r12:-DJMEP_LL_COPY_ROUND=12 ..." also builds this tree with those nvcc
#   flags (comma-separated) as variant new-r12 (benchmarked after "new", label
#   after-r12). TEST_V / SAN_V / NCU_V pick the builds the tests, sanitizer and ncu use.
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
  want="new"; [[ $STAGES == *bench* || $STAGES == *ncu* || $STAGES == *dram* ]] && want="$want base ${OLDER:-}"
  [[ $STAGES == *probes* ]] && want="$want base-probes new-probes"
  for vf in ${VARIANTS:-}; do want="$want new-${vf%%:*}"; done
  # Each build from its own copy of its sources, all at once (16 cores; one build
  # alone leaves most idle), its log in $OUT/build_<v>.txt.
  for v in $want; do
    orig=$REPO; [[ $v != new* ]] && orig=/tmp/${v%-probes}
    src=/tmp/src-$v; rm -rf "$src" && mkdir -p "$src"
    (cd "$orig" && tar --exclude=./.whl --exclude=./build --exclude=./.git -cf - .) | tar -xf - -C "$src"
    # nvcc reads NVCC_APPEND_FLAGS on every call: a variant's flags reach each .cu file.
    flags=""; [[ $v == *probes ]] && flags="-DJMEP_LL_PROBES"
    for vf in ${VARIANTS:-}; do [[ $v == new-${vf%%:*} ]] && flags="${vf#*:}" && flags=${flags//,/ }; done
    target=""; [[ $v != new ]] && { rm -rf "$(site $v)"; target="--target $(site $v)"; }
    (cd "$src" && NVCC_APPEND_FLAGS="$flags" python3 -m pip install --no-build-isolation --no-deps -q \
      $target . > "$OUT/build_$v.txt" 2>&1; echo "== $(date -u +%T) built $v: exit $?") &
  done
  wait
  for v in $want; do grep -v "^WARNING" "$OUT/build_$v.txt" | tail -3; done
fi
if [[ $STAGES == *test* ]]; then
  echo "== $(date -u +%T) LL tests on one GPU: ${TESTK:=one_gpu_one_rank or two_processes_one_gpu}"
  # TEST_V: the build the tests import (default new, the installed one).
  PYTHONPATH=$(site ${TEST_V:-new}) JMEP_LL_LOG_DIR=$OUT/workers JMEP_LL_TEST_TIMEOUT=240 \
    timeout ${LL_TIMEOUT:-300} pytest -q -rA \
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
  # PASSES=2: a second pass in the opposite order (files latency_<label>_p2).
  order="${OLDER:-} base new $(for vf in ${VARIANTS:-}; do echo new-${vf%%:*}; done)"
  for pass in $(seq 1 ${PASSES:-1}); do
    for v in $order; do
      echo "== $(date -u +%T) bench_latency: $v (pass $pass)"
      label=before; [[ $v == new* ]] && label=after${v#new}; [[ $v == start ]] && label=start
      sfx=""; ((pass > 1)) && sfx=_p$pass
      (cd /tmp && PYTHONPATH=$(site $v) timeout 280 python3 "$REPO/benchmarks/bench_latency.py" \
        --label $label --out "$OUT/latency_$label$sfx" 2>&1 | tail -12)
    done
    order=$(echo $order | tr ' ' '\n' | tac | tr '\n' ' ')
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
if [[ $STAGES == *dram* ]]; then
  # DRAM bytes and L2 hit rate per kernel in the step loop, the L2 as the previous
  # kernel left it: no flush, and application replay (these metrics take several
  # passes; kernel replay would run passes 2.. after ncu's own save/restore).
  NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  for v in ${NCU_V:-base new}; do
    for t in ${DRAM_T:-1 128}; do
      for dt in "" --bf16; do
        echo "== $(date -u +%T) ncu dram: $v T=$t $dt"
        (cd /tmp && PYTHONPATH=$(site $v) timeout 150 "$NCU" -k regex:ll_ --launch-skip 16 \
          --launch-count 4 --replay-mode application --cache-control none --clock-control none --metrics \
          gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct \
          python3 "$REPO/benchmarks/ncu_ll.py" --tokens $t $dt > "$OUT/dram_${v}_T$t$dt.txt" 2>&1)
        grep -E "ll_(dispatch|combine)_kernel|gpu__time|dram__bytes|lts__t_sector" "$OUT/dram_${v}_T$t$dt.txt" | head -24
      done
    done
  done
fi
echo "== $(date -u +%T) done"
} 2>&1 | tee "$OUT/log.txt"
# `run` brings back only a few files: everything but log.txt travels as one archive.
(cd "$OUT" && tar -czf /tmp/gpu_latency_all.tgz --exclude=./log.txt . &&
  find . -mindepth 1 -maxdepth 1 ! -name log.txt -exec rm -rf {} + && mv /tmp/gpu_latency_all.tgz all.tgz)
