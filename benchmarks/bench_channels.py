"""Channel-layer micro-benchmarks, memory and port channels side by side, on
one process driving GPUs 0 and 1, with a plain cudaMemcpyPeerAsync baseline:

- signal ping-pong round trip (one thread signals, the peer waits and answers);
- put latency at 4 KiB: half the round trip of a ping-pong that carries 4 KiB
  each way (put + signal, peer waits, puts back);
- put bandwidth 4 KiB .. 64 MiB, one direction (port: puts then flush).

python benchmarks/bench_channels.py --out benchmarks/results/channels_h200x2
"""
from __future__ import annotations

import argparse
import json
import time

from jax_mscclpp_ep import _ep_testing as kt  # channel test kernels (test-only module)
from jax_mscclpp_ep import channels

MiB = 1 << 20
SIZES = [4096 << (2 * i) for i in range(8)]  # 4 KiB .. 64 MiB


def pingpong_us(comms, rounds, payload):
    for warm in (True, False):
        n = max(rounds // 10, 10) if warm else rounds
        for c in comms:
            kt.scratch(c)
            kt.test_pingpong(c, 1 - c.rank, n, c.rank == 0, payload=payload, src_off=0,
                            dst_off=65536)
        for c in comms:
            c.sync()
        err, ns = kt.scratch(comms[0])
        kt.scratch(comms[1])
        assert err == 0
    return ns / rounds / 1e3


def mem_blocks(n):
    return max(1, min(132, n // (64 * 1024)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/channels_h200x2")
    ap.add_argument("--rounds", type=int, default=5000)
    args = ap.parse_args()
    res = {"sizes": SIZES, "kinds": {}}
    for kind in ("memory", "port"):
        comms = channels.create_communicators(80 * MiB, devices=[0, 1], force_port=kind == "port")
        assert comms[0].channel_kind(1) == (2 if kind == "port" else 1)
        r = {"rtt_us": pingpong_us(comms, args.rounds, 0),
             "rtt_4k_us": pingpong_us(comms, args.rounds, 4096)}
        r["put_4k_latency_us"] = r["rtt_4k_us"] / 2
        bw, copy = [], []
        for n in SIZES:
            iters = max(5, min(200, (256 * MiB) // n))
            t = kt.bench_put(comms[0], 1, n, iters, mem_blocks(n), 512)
            bw.append(n / t / 1e9)
            if kind == "memory":
                copy.append(n / kt.bench_peer_copy(comms[0], 1, n, iters) / 1e9)
        r["put_GBps"] = bw
        if copy:
            res["peer_copy_GBps"] = copy
        res["kinds"][kind] = r
        channels.close_communicators(comms)
    pc = res["peer_copy_GBps"]
    m, p = res["kinds"]["memory"], res["kinds"]["port"]
    lines = [
        "# Channel layer micro-benchmarks (2x H200, NVLink, one process, GPU0 -> GPU1)",
        "",
        f"measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "| metric | memory channel | port channel | goal |",
        "|---|---|---|---|",
        f"| signal ping-pong round trip | {m['rtt_us']:.2f} us | {p['rtt_us']:.2f} us | mem <= 5 us, port <= 20 us |",
        f"| put latency 4 KiB (half a 4 KiB ping-pong) | {m['put_4k_latency_us']:.2f} us | {p['put_4k_latency_us']:.2f} us | |",
        "",
        "| size | memory put GB/s | port put GB/s | cudaMemcpyPeerAsync GB/s | mem/copy | port/copy |",
        "|---|---|---|---|---|---|",
    ]
    for i, n in enumerate(SIZES):
        size = f"{n // MiB} MiB" if n >= MiB else f"{n // 1024} KiB"
        lines.append(f"| {size} | {m['put_GBps'][i]:.1f} | {p['put_GBps'][i]:.1f} | {pc[i]:.1f} | "
                     f"{m['put_GBps'][i] / pc[i]:.0%} | {p['put_GBps'][i] / pc[i]:.0%} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    with open(args.out + ".json", "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
