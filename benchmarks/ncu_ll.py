"""A few LL steps at one token count, for the CUDA profiler's command line (ncu).

bench_latency.py reads CUPTI through jax.profiler, which ncu cannot share; this runs
bench_ll's step loop (dispatch + combine, R = 1) without it:

  ncu -k regex:ll_ --launch-skip 8 --launch-count 2 python3 benchmarks/ncu_ll.py --tokens 1
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="128,7168,8,256", help="M,H,K,E")
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="bf16 dispatch (default fp8)")
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args()
    # A longer device wait than the benchmarks': ncu serialises and replays kernels.
    _, mesh, (hx, hidx, hw), y, buf, _ = bench_ll.one_gpu_buffer("ncu_ll", a, timeout_s=30.0)
    t = a.tokens
    x, idx, w = bench_ll.put(mesh, hx[:, :t], hidx[:, :t], hw[:, :t])
    f = bench_ll.ours(mesh, buf, not a.bf16, a.steps)["step_loop"]
    for _ in range(2):
        jax.block_until_ready(f(x, idx, w, y))
    buf.check()
    buf.close()


if __name__ == "__main__":
    main()
