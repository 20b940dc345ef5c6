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
import statistics
import tempfile

import jax


class KernelTrace:
    def __init__(self):
        self._dir = tempfile.mkdtemp(prefix="jmep_trace_")
        self.events, self.process = [], {}

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
            self.load(json.load(f))
        return False

    def load(self, trace) -> "KernelTrace":
        """Take the events of a Chrome/Perfetto trace (a dict with traceEvents, or the list)."""
        events = trace["traceEvents"] if isinstance(trace, dict) else trace
        self.process = {e.get("pid"): str(e.get("args", {}).get("name", ""))
                        for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
        self.events = [e for e in events if e.get("ph") == "X" and "dur" in e]
        return self

    def _on_gpu(self, e) -> bool:
        # The trace also holds host-side events named after the kernel (XLA's launch
        # of the thunk, a few us each): only the GPU's own timeline is the kernel.
        return "GPU" in self.process.get(e.get("pid"), "")

    def where(self, kernel: str) -> dict:
        """Per trace process: (events named ``kernel``, their median us) (an audit)."""
        by = {}
        for e in self.events:
            if kernel in str(e.get("name", "")):
                by.setdefault(self.process.get(e.get("pid"), str(e.get("pid"))), []).append(float(e["dur"]))
        return {k: (len(v), round(statistics.median(v), 2)) for k, v in by.items()}

    def durations_us(self, kernel: str) -> list:
        """Durations of the kernel's launches on the GPU timeline, in launch order."""
        hits = [e for e in self.events if kernel in str(e.get("name", "")) and self._on_gpu(e)]
        hits.sort(key=lambda e: float(e.get("ts", 0)))
        return [float(e["dur"]) for e in hits]

    def names(self) -> list:
        return sorted({str(e.get("name", "")) for e in self.events})
