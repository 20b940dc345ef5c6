"""Kernel durations from the CUDA profiler, through jax.profiler (CUPTI kernel events).

    with KernelTrace() as kt:
        jax.block_until_ready(f(*args))
    kt.durations_us("ll_dispatch_kernel")   # one entry per launch, in microseconds

This is how the DeepEP anchor (../shared/anchors/) was measured (bench_kineto reads the
same CUPTI events through torch's profiler), so the two are comparable; the kernels'
own %globaltimer figure (Buffer timing) is printed beside it by the benchmarks.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import tempfile

import jax


class KernelTrace:
    def __init__(self):
        self._dir = tempfile.mkdtemp(prefix="jmep_trace_")
        self.events = []

    def __enter__(self):
        jax.profiler.start_trace(self._dir, create_perfetto_trace=True)
        return self

    def __exit__(self, *exc):
        jax.profiler.stop_trace()
        paths = glob.glob(os.path.join(self._dir, "**", "*.trace.json.gz"), recursive=True)
        paths += glob.glob(os.path.join(self._dir, "**", "perfetto_trace.json.gz"), recursive=True)
        if not paths:
            raise RuntimeError(f"jax.profiler wrote no trace JSON under {self._dir}")
        with gzip.open(sorted(paths)[-1], "rt") as f:
            trace = json.load(f)
        events = trace["traceEvents"] if isinstance(trace, dict) else trace
        self.events = [e for e in events if e.get("ph") == "X" and "dur" in e]
        return False

    def durations_us(self, kernel: str) -> list:
        """Durations of the launches whose name contains ``kernel``, in launch order."""
        hits = [e for e in self.events if kernel in str(e.get("name", ""))]
        hits.sort(key=lambda e: float(e.get("ts", 0)))
        return [float(e["dur"]) for e in hits]

    def names(self) -> list:
        return sorted({str(e.get("name", "")) for e in self.events})
