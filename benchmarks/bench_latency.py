"""LL latency vs tokens per rank, measured the way the DeepEP anchor is (issue 14).

For each T and each dispatch dtype, one jitted lax.fori_loop of --steps steps (dispatch,
then combine of fixed expert outputs with this step's handle) runs under the CUDA
profiler; per kernel the median CUPTI duration over those launches is reported, next to
the kernels' own %globaltimer mean (first block start to last block end) from the same
loop. One run measures one build; --label names it ("before", "after"); the report
(report_latency.py) puts runs and the anchor side by side.

  python benchmarks/bench_latency.py --label after --out OUT/latency_after
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_ll  # noqa: E402  (inputs and shard_map helpers)
from kernel_trace import KernelTrace  # noqa: E402


def parse():
    ap = argparse.ArgumentParser()
    bench_ll.add_one_gpu_args(ap, tokens="1,2,4,8,16,32,64,128")
    ap.add_argument("--routing", default="random", choices=("random", "balanced"),
                    help="expert ids (bench_ll.host_inputs); the anchor's are random")
    ap.add_argument("--label", default="ours")
    return ap.parse_args()


def spread(xs):
    """(10th, 90th percentile): CUPTI medians of one build moved between runs at some T."""
    if len(xs) < 10:
        return None, None
    q = statistics.quantiles(xs, n=10)
    return round(q[0], 2), round(q[-1], 2)


def main():
    a = parse()
    tokens = [int(t) for t in a.tokens.split(",")]
    gpu, mesh, (hx, hidx, hw), y, buf, (m, h, k, e) = bench_ll.one_gpu_buffer("bench_latency", a,
                                                                             a.routing)
    out = {"label": a.label, "device_kind": gpu.device_kind, "jax": jax.__version__,
           "host": platform.node(), "shape": {"M": m, "H": h, "K": k, "E": e, "R": 1}, "routing": a.routing,
           "steps": a.steps, "metric": "median CUPTI kernel duration (us) over the loop's launches; "
           "globaltimer: the kernels' own mean", "sweep": []}
    # bench_ll's step loop: `steps` x (dispatch, combine), the order token chained
    loops = {fp8: bench_ll.ours(mesh, buf, fp8, a.steps)["step_loop"] for fp8 in (True, False)}
    for t in tokens:
        x, idx, w = bench_ll.put(mesh, hx[:, :t], hidx[:, :t], hw[:, :t])
        row = {"T": t}
        for fp8, tag in ((True, "fp8"), (False, "bf16")):
            f = loops[fp8]
            jax.block_until_ready(f(x, idx, w, y))  # compile + warm
            st = buf._device_state
            st.timing(reset=True)
            with KernelTrace() as kt:
                jax.block_until_ready(f(x, idx, w, y))
            gt = st.timing(reset=True)
            d, c = kt.durations_us("ll_dispatch_kernel"), kt.durations_us("ll_combine_kernel")
            if t == tokens[0]:
                print(f"{tag}: events per trace process: {kt.where('ll_dispatch_kernel')}", flush=True)
            if len(d) < a.steps or len(c) < a.steps:
                raise RuntimeError(f"T={t} {tag}: the trace holds {len(d)} dispatch and {len(c)} "
                                   f"combine launches for {a.steps} steps; where: "
                                   f"{kt.where('ll_dispatch_kernel')}; names: {kt.names()[:20]}")
            row[f"dispatch_{tag}_raw_us"] = d
            row[f"combine_after_{tag}_raw_us"] = c
            row[f"dispatch_{tag}_us"] = bench_ll.median(d)
            row[f"combine_after_{tag}_us"] = bench_ll.median(c)
            row[f"dispatch_{tag}_p10_p90_us"] = spread(d)
            row[f"combine_after_{tag}_p10_p90_us"] = spread(c)
            row[f"dispatch_{tag}_globaltimer_us"] = round(gt.get("dispatch_kernel", float("nan")), 2)
            row[f"combine_after_{tag}_globaltimer_us"] = round(gt.get("combine_kernel", float("nan")), 2)
        buf.check()
        out["sweep"].append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_raw_us")}), flush=True)
    buf.close()
    if a.out:
        with open(a.out + ".json", "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
