#!/usr/bin/env bash
# Gradients through a lax.scan of MoE layers on one Buffer (R = 1), under several XLA
# settings; the optimized HLO of the gradient (loop and scan) goes to $OUT/hlo_*.txt.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cd /tmp
P=$OLDPWD/scripts/probe_scan_grad.py
run() { echo "== $*"; env "$@" timeout 120 python3 "$P" 2>&1 | grep -vE "^\s*$" | tail -${TAIL:-3}; }
for scan in 0 1; do
  rm -rf /tmp/hlo; TAIL=12 run JMEP_PROBE_SCAN=$scan XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text"
  f=$(grep -l "jmep_ll_gather_rows" /tmp/hlo/*after_optimizations.txt | head -1)
  [[ -n "$f" ]] && cp "$f" "$OUT/hlo_scan$scan.txt"
done
run XLA_FLAGS=--xla_gpu_enable_command_buffer=
run XLA_FLAGS=--xla_gpu_command_buffer_scheduling_mode=SERIALIZE
run XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=false
run XLA_FLAGS="--xla_gpu_enable_command_buffer= --xla_gpu_enable_dynamic_slice_fusion=false"
for s in 0 1; do
  echo "== HLO scan=$s: exchanges in schedule order"
  grep -nE "custom_call_target=\"jmep|command_buffer|dynamic-slice-fusion|address_computation| while\(" "$OUT/hlo_scan$s.txt" | sed -E 's/metadata=\{[^}]*\}//; s/backend_config=.*//' | cut -c1-240 | head -40
done
