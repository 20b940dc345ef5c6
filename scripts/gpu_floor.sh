#!/usr/bin/env bash
# Issue 14's floors, one device call (after a build of the package, e.g. gpu_latency.sh):
# the handoff, launch-floor and instruction-fetch (icache_latency) micro benchmarks, and ncu's unlocked-clock durations of
# the floor kernels and of the LL kernels at T = 1 and 128 (to set ncu beside the
# CUPTI medians of bench_latency from the same call). No clock locking and no cache
# flush between launches: as the kernels run in a jitted loop.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
REPO=$(pwd)
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
NCUM="--clock-control none --cache-control none --metrics gpu__time_duration.sum --csv"
{
echo "== $(date -u +%T) micro benchmarks"
for m in handoff_latency launch_floor icache_latency; do
  nvcc -O3 -std=c++17 -arch=sm_90 benchmarks/micro/$m.cu -o /tmp/$m || continue
  /tmp/$m
done
echo "== $(date -u +%T) ncu (clocks not locked): floor kernels"
"$NCU" $NCUM /tmp/launch_floor > "$OUT/ncu_floor.csv" 2>&1
python3 benchmarks/ncu_durations.py "$OUT/ncu_floor.csv" --skip 10
for t in ${FLOOR_T:-1 128}; do
  echo "== $(date -u +%T) ncu (clocks not locked): LL kernels, T=$t"
  (cd /tmp && timeout 150 "$NCU" $NCUM -k regex:ll_ --launch-skip 40 --launch-count 200 \
    python3 "$REPO/benchmarks/ncu_ll.py" --tokens $t --steps 60 > "$OUT/ncu_ll_T$t.csv" 2>&1)
  python3 benchmarks/ncu_durations.py "$OUT/ncu_ll_T$t.csv"
done
echo "== $(date -u +%T) floors done"
} 2>&1 | tee -a "$OUT/log.txt"
