"""Does an LL kernel pay for the kernel that ran before it? (issue 14)

Per T, the CUPTI median duration of dispatch in a loop of dispatches only and in the
loop of dispatch + combine steps (bench_latency's), and of combine in a loop of
combines only (one dispatch's handle, reused) and in the step loop. A kernel that is
faster after itself than after the other one loses time to state the other one
evicted (instruction cache, constant cache, L2 lines of its own state).

  python benchmarks/bench_isolation.py [--tokens 1,128] [--fp8 1] [--out X]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_ll  # noqa: E402
from kernel_trace import KernelTrace  # noqa: E402


def traced(f, args):
    """The CUDA-profiler trace of one call of f, after a call that compiles and warms it."""
    jax.block_until_ready(f(*args))
    with KernelTrace() as kt:
        jax.block_until_ready(f(*args))
    return kt


def main():
    ap = argparse.ArgumentParser()
    bench_ll.add_one_gpu_args(ap)
    ap.add_argument("--fp8", type=int, default=1)
    a = ap.parse_args()
    gpu, mesh, (hx, hidx, hw), y, buf, (m, h, k, e) = bench_ll.one_gpu_buffer("bench_isolation", a)
    fs = bench_ll.ours(mesh, buf, bool(a.fp8), a.steps)
    rows = []
    print(f"{gpu.device_kind}, M={m} H={h} K={k} E={e}, fp8={a.fp8}; CUPTI medians (us) "
          f"over {a.steps} launches")
    for t in map(int, a.tokens.split(",")):
        x, idx, w = bench_ll.put(mesh, hx[:, :t], hidx[:, :t], hw[:, :t])
        cargs = fs["comb_args"](x, idx, w, y)
        d_alone = traced(fs["disp_loop"], (x, idx)).durations_us("ll_dispatch_kernel")
        c_alone = traced(fs["comb_loop"], cargs).durations_us("ll_combine_kernel")
        steps = traced(fs["step_loop"], (x, idx, w, y))
        d_step, c_step = steps.durations_us("ll_dispatch_kernel"), steps.durations_us("ll_combine_kernel")
        row = {"T": t}
        for name, xs in (("dispatch_alone", d_alone), ("dispatch_in_steps", d_step),
                         ("combine_alone", c_alone), ("combine_in_steps", c_step)):
            row[name + "_us"] = bench_ll.median(xs)
            row[name + "_n"] = len(xs)
        bench_ll.add_row(buf, rows, row)
    buf.close()
    bench_ll.write_rows(a, gpu, (m, h, k, e), rows, fp8=a.fp8)


if __name__ == "__main__":
    main()
