"""benchmarks/kernel_trace.py reads kernel durations off the GPU's timeline only (CPU only).

jax.profiler's trace names the host's launch of a custom call's kernel like the kernel
itself (a few µs each, one per launch); counting those too once halved the medians of
issue 14's table. A synthetic trace with both kinds of event checks the filter.
"""
import statistics

import numpy as np

import _bench_module


def _kernel_trace():
    return _bench_module.load("kernel_trace")


def _trace(rng, n):
    gpu = rng.uniform(8.0, 10.0, n)    # the kernel's own durations
    host = rng.uniform(3.0, 6.0, n)    # the launches' host-side events
    ev = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
          {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}}]
    for i in range(n):
        ev.append({"ph": "X", "pid": 1, "name": "ll_dispatch_kernel", "ts": 10.0 * i, "dur": host[i]})
        ev.append({"ph": "X", "pid": 7, "name": "jmep::ll_dispatch_kernel(LlDispatchArgs)",
                   "ts": 10.0 * i + 2, "dur": gpu[i]})
        ev.append({"ph": "X", "pid": 7, "name": "ll_combine_kernel", "ts": 10.0 * i + 5, "dur": 1.0})
    rng.shuffle(ev)
    return {"traceEvents": ev}, gpu, host


def test_only_gpu_timeline_events_count():
    rng = np.random.default_rng()
    n = int(rng.integers(20, 60))
    trace, gpu, host = _trace(rng, n)
    kt = _kernel_trace().KernelTrace().load(trace)
    d = kt.durations_us("ll_dispatch_kernel")
    assert d == [float(v) for v in gpu]  # GPU events only, in launch order
    assert kt.durations_us("ll_combine_kernel") == [1.0] * n
    where = kt.where("ll_dispatch_kernel")
    assert where["/host:CPU"] == (n, round(statistics.median(host), 2))
    assert where["/device:GPU:0"] == (n, round(statistics.median(gpu), 2))
    # the mixed median the old parser reported lies below every GPU duration's median
    assert statistics.median(np.concatenate([gpu, host])) < statistics.median(gpu)


def test_list_form_and_unknown_process():
    rng = np.random.default_rng()
    trace, gpu, _ = _trace(rng, 5)
    events = trace["traceEvents"] + [{"ph": "X", "pid": 99, "name": "ll_dispatch_kernel", "ts": 0, "dur": 1}]
    kt = _kernel_trace().KernelTrace().load(events)
    assert sorted(kt.durations_us("ll_dispatch_kernel")) == sorted(float(v) for v in gpu)
    assert kt.where("ll_dispatch_kernel")["99"] == (1, 1.0)
