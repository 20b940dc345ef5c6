"""How an LL call's time splits between its send and its receive (issue 14).

Per T and dispatch dtype, a jitted loop of split steps (dispatch_send, dispatch_recv,
combine_send, combine_recv: four kernels, each a whole launch) and bench_latency's loop
of whole calls run under the CUDA profiler. The CUPTI medians of each half beside the
whole call's say which half holds the time, without the probes' atomics (which perturb
a T = 128 call by several µs). At R = 1 a receive kernel finds its counts or flags
already there, so it measures the copy or the reduce alone (plus its launch).

  python benchmarks/bench_phases.py [--tokens 1,128] [--out X]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

import jax_mscclpp_ep as ep  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_ll  # noqa: E402
from bench_isolation import traced  # noqa: E402


def split_loop(mesh, buf, fp8, steps):
    """bench_ll's step loop with each call in its two halves."""
    le = buf.config.num_experts // buf.num_ranks

    def loop(x, idx, w, y):
        def body(i, c):
            order, stats = c
            res = ep.dispatch_recv(ep.dispatch_send(x, idx, buf, use_fp8=fp8, stats=stats,
                                                    after=order))
            _, order = ep.combine_recv(ep.combine_send(y, idx, w, res.handle, buf),
                                       return_order=True)
            return order, res.stats
        init = (bench_ll.varying(jnp.zeros((), jnp.int32), idx),
                bench_ll.varying(jnp.zeros((le,), jnp.int32), idx))
        return lax.fori_loop(0, steps, body, init_val=init)[1]
    return bench_ll.smap(mesh, loop)


def main():
    ap = argparse.ArgumentParser()
    bench_ll.add_one_gpu_args(ap)
    a = ap.parse_args()
    gpu, mesh, (hx, hidx, hw), y, buf, (m, h, k, e) = bench_ll.one_gpu_buffer("bench_phases", a)
    print(f"{gpu.device_kind}, M={m} H={h} K={k} E={e}; CUPTI medians (us) over {a.steps} launches")
    rows = []
    for t in map(int, a.tokens.split(",")):
        x, idx, w = bench_ll.put(mesh, hx[:, :t], hidx[:, :t], hw[:, :t])
        for fp8 in (True, False):
            whole = traced(bench_ll.ours(mesh, buf, fp8, a.steps)["step_loop"], (x, idx, w, y))
            halves = traced(split_loop(mesh, buf, fp8, a.steps), (x, idx, w, y))
            row = {"T": t, "dtype": "fp8" if fp8 else "bf16"}
            for kern, name in (("ll_dispatch_kernel", "dispatch"), ("ll_combine_kernel", "combine")):
                d = halves.durations_us(kern)  # launch order: send, recv, send, recv, ...
                if len(d) != 2 * a.steps:
                    raise RuntimeError(f"T={t}: {len(d)} {kern} launches for {a.steps} split steps")
                row[name + "_us"] = bench_ll.median(whole.durations_us(kern))
                row[name + "_send_us"], row[name + "_recv_us"] = bench_ll.median(d[0::2]), bench_ll.median(d[1::2])
            bench_ll.add_row(buf, rows, row)
    buf.close()
    bench_ll.write_rows(a, gpu, (m, h, k, e), rows, steps=a.steps)


if __name__ == "__main__":
    main()
