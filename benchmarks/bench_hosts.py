"""Across hosts, side by side: the LL exchange at R = 2 over memory channels, CUDA-IPC
port channels and UCX port channels, plus the channel layer's own round trip, put
bandwidth and the proxy's cost per trigger, in one run.

The LL rows: two processes (jax.distributed on 127.0.0.1) share GPU 0 where only one
GPU is lent; their kernels time-slice (milliseconds per switch), so those figures are
dominated by the switching, not by the channels. The channel rows run in one process
(both ranks on the GPU, no switching). UCX goes over TCP loopback (UCX_TLS=tcp,cuda_copy
unless set): a correctness rig, not InfiniBand.

  python benchmarks/bench_hosts.py --out benchmarks/results/hosts_h200x1
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

MiB = 1 << 20
SIZES = [4096 << (2 * i) for i in range(7)]  # 4 KiB .. 16 MiB (64 MiB with --big)
SYSTEMS = {"memory": {"force_port": False}, "cuda-ipc-port": {"force_port": True},
           "ucx-port": {"ucx": True}}


def parse():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="128,7168,8,256", help="M,H,K,E (T = M)")
    ap.add_argument("--calls", type=int, default=100, help="timed calls per op (UCX: a third)")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--big", action="store_true", help="put bandwidth up to 64 MiB")
    ap.add_argument("--gpu", type=int, default=0, help="CUDA ordinal both processes use")
    ap.add_argument("--out", default="")
    ap.add_argument("--worker", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--ll-file", default="", help=argparse.SUPPRESS)
    return ap.parse_args()


def launch(a):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", XLA_PYTHON_CLIENT_PREALLOCATE="false",
               PYTHONUNBUFFERED="1")
    env.setdefault("UCX_TLS", "tcp,cuda_copy")
    a.ll_file = os.path.join(tempfile.mkdtemp(prefix="bench_hosts_"), "ll.json")
    procs = [subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--worker", str(i),
                               "--port", str(port), "--ll-file", a.ll_file], env=env)
             for i in range(2)]
    codes = [p.wait() for p in procs]
    if any(codes):
        sys.exit(f"bench_hosts: worker exit codes {codes}")
    with open(a.ll_file) as fh:
        res = json.load(fh)
    os.environ.setdefault("UCX_TLS", "tcp,cuda_copy")
    res["channels"] = channel_rows(a)
    text = render(res)
    print(text)
    if a.out:
        with open(a.out + ".json", "w") as fh:
            json.dump(res, fh, indent=1, default=str)
        with open(a.out + ".md", "w") as fh:
            fh.write(text)


def kv_barrier(name):
    from jax._src import distributed
    distributed.global_state.client.wait_at_barrier(name, 300_000)


def ll_rows(a, mesh, me):
    """Per system: dispatch / combine call medians, kernel means, proxy cost per trigger."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    import jax_mscclpp_ep as ep
    from bench_ll import time_calls as median_us  # benchmarks/ is on sys.path (the script's dir)

    m, h, k, e = (int(v) for v in a.shape.split(","))
    r = 2
    rng = np.random.default_rng(0)
    x = rng.standard_normal((r, m, h)).astype(jnp.bfloat16)
    idx = np.stack([np.stack([rng.permutation(e)[:k] for _ in range(m)]) for _ in range(r)])
    w = rng.uniform(0.1, 1.0, (r, m, k)).astype(np.float32)
    y = rng.standard_normal((r, e // r, r * m, h)).astype(jnp.bfloat16)
    sh = NamedSharding(mesh, P("ep"))

    def put(v):
        v = np.ascontiguousarray(v)
        return jax.make_array_from_callback(v.shape, sh, lambda i: v[i])

    xs, ids, ws, ys = put(x), put(idx.astype(np.int32)), put(w), put(y)

    def smap(fn):
        def body(*args):
            return jax.tree.map(lambda o: o[None], fn(*[v[0] for v in args]))
        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))

    rows = {}
    for name in a.systems.split(","):
        kw = dict(SYSTEMS[name])
        host = f"simhost{me}" if kw.pop("ucx", False) else None
        buf = ep.Buffer(ep.EPConfig(num_experts=e, max_tokens_per_rank=m, hidden=h), mesh=mesh,
                        axis_name="ep", host_id=host, **kw)
        disp = smap(lambda xx, ii: ep.dispatch(xx, ii, buf, use_fp8=True).handle[:2])
        handle = disp(xs, ids)
        comb = smap(lambda yy, ii, ww, s, lr: ep.combine(
            yy, ii, ww, ep.DispatchHandle(s, lr, jnp.zeros((), jnp.int32)), buf))
        n = a.calls if host is None else max(10, a.calls // 3)
        comm = buf._device_state.comms[0]
        st0 = comm.proxy_stats()
        buf._device_state.timing(reset=True)
        d_us = median_us(disp, (xs, ids), n)
        kd = buf._device_state.timing(reset=True)
        c_us = median_us(comb, (ys, ids, ws, *handle), n)
        kc = buf._device_state.timing(reset=True)
        st1 = comm.proxy_stats()
        buf.check()
        ipc_ops, ucx_ops = st1[0] - st0[0], st1[2] - st0[2]
        ops = ipc_ops + ucx_ops
        rows[name] = {
            "dispatch_call_us": d_us, "combine_call_us": c_us,
            "dispatch_kernel_us": kd.get("dispatch_kernel"), "combine_kernel_us": kc.get("combine_kernel"),
            "proxy_triggers_per_call": ops / (2 * (n + 3)) if ops else 0.0,
            "proxy_ns_per_trigger": ((st1[1] - st0[1]) + (st1[3] - st0[3])) / ops if ops else None,
            "channels": [c.split("\n")[0] for c in buf.peer_channels()[me]],
        }
        if me == 0:
            print(f"{name}: {rows[name]}", flush=True)
        buf.close()
    return rows


def channel_rows(a):
    """Port channels on their own, in this one process (both ranks on GPU `--gpu`, so no
    time-slicing between processes): ping-pong round trip (signal only; 4 KiB put +
    signal), put bandwidth (puts then flush), and the proxy's cost per trigger (FIFO pop
    to request posted). CUDA-IPC: copy engine; UCX: the two ranks as two hosts."""
    from jax_mscclpp_ep import _ep_testing as kt  # channel test kernels (test-only module)
    from jax_mscclpp_ep import channels
    out = {}
    sizes = SIZES + ([64 * MiB] if a.big else [])
    for name, hosts in (("cuda-ipc-port", None), ("ucx-port", ["simhost0", "simhost1"])):
        comms = channels.create_communicators(80 * MiB, devices=[a.gpu, a.gpu], force_port=True,
                                              host_id=hosts)
        row = {}
        for payload, key in ((0, "rtt_signal_us"), (4096, "rtt_4k_us")):
            rounds = 2000
            for warm in (True, False):
                for c in comms:
                    kt.scratch(c)
                    kt.test_pingpong(c, 1 - c.rank, 100 if warm else rounds, c.rank == 0,
                                    payload=payload, src_off=0, dst_off=65536)
                for c in comms:
                    c.sync()
                err, ns = kt.scratch(comms[0])
                kt.scratch(comms[1])
                assert err == 0
            row[key] = ns / rounds / 1e3
        c = comms[0]
        st0 = c.proxy_stats()
        bw = []
        for n in sizes:
            iters = max(3, min(50, (64 * MiB) // n))
            bw.append(n / kt.bench_put(c, 1, n, iters, 32, 512) / 1e9)
        st1 = c.proxy_stats()
        ops = (st1[0] - st0[0]) + (st1[2] - st0[2])
        row["put_GBps"] = dict(zip(sizes, bw))
        row["proxy_ns_per_put"] = ((st1[1] - st0[1]) + (st1[3] - st0[3])) / ops if ops else None
        row["channel"] = c.describe_peer(1)
        print(f"{name}: { {k: v for k, v in row.items() if k != 'channel'} }", flush=True)
        channels.close_communicators(comms)
        out[name] = row
    return out


def render(res):
    lines = [f"# Across hosts, side by side ({res['machine']})", "",
             f"{res['note']}", "",
             f"LL exchange, R = 2, M = T = {res['shape'][0]}, H = {res['shape'][1]}, "
             f"K = {res['shape'][2]}, E = {res['shape'][3]}, fp8 dispatch / bf16 combine; "
             "call = one jitted call to block_until_ready (median), kernel = %globaltimer mean.", "",
             "| system | dispatch call µs | combine call µs | dispatch kernel µs | combine kernel µs "
             "| proxy triggers / call | proxy ns / trigger |", "|---|---|---|---|---|---|---|"]
    f = lambda v, d=1: "—" if v is None else f"{v:.{d}f}"  # noqa: E731
    for name, r in res["ll"].items():
        lines.append(f"| {name} | {f(r['dispatch_call_us'])} | {f(r['combine_call_us'])} | "
                     f"{f(r['dispatch_kernel_us'])} | {f(r['combine_kernel_us'])} | "
                     f"{f(r['proxy_triggers_per_call'], 0)} | {f(r['proxy_ns_per_trigger'], 0)} |")
    lines += ["", "Port channels alone: one process, both ranks on the GPU (no time-slicing between "
              "processes); test kernels push the triggers, GPU memory at both ends:", "",
              "| channel | round trip, signal µs | round trip, 4 KiB + signal µs | proxy ns / put | "
              + " | ".join(f"put {n // 1024} KiB GB/s" if n < MiB else f"put {n // MiB} MiB GB/s"
                           for n in next(iter(res["channels"].values()))["put_GBps"]) + " |",
              "|---|---|---|---|" + "---|" * len(next(iter(res["channels"].values()))["put_GBps"])]
    for name, r in res["channels"].items():
        lines.append(f"| {name} | {f(r['rtt_signal_us'])} | {f(r['rtt_4k_us'])} | "
                     f"{f(r['proxy_ns_per_put'], 0)} | "
                     + " | ".join(f(v, 3) for v in r["put_GBps"].values()) + " |")
    lines += ["", "UCX endpoint (rank 0 -> 1):", "", "```", res["channels"]["ucx-port"]["channel"].strip(), "```"]
    return "\n".join(lines) + "\n"


def worker(a):
    me = a.worker
    import jax
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{a.port}", num_processes=2,
                               process_id=me, local_device_ids=[a.gpu])
    import numpy as np
    from jax.sharding import Mesh

    mesh = Mesh(np.array(sorted(jax.devices(), key=lambda d: d.id)), ("ep",))
    ll = ll_rows(a, mesh, me)
    if me == 0:
        from jax_mscclpp_ep import ucx
        gpu = jax.devices()[0].device_kind
        res = {"machine": f"1x {gpu}, two processes sharing it, {platform.node()}",
               "note": ("UCX rows: two processes with different JMEP_HOST_IDs on one machine, "
                        f"UCX_TLS={os.environ.get('UCX_TLS')}, {ucx.version()}: TCP loopback with "
                        "cuda_copy staging, a correctness rig, not InfiniBand. Both processes' "
                        "kernels time-slice one GPU."),
               "shape": [int(v) for v in a.shape.split(",")], "ll": ll,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        with open(a.ll_file, "w") as fh:
            json.dump(res, fh, default=str)
    kv_barrier("bench_hosts_done")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    args = parse()
    if args.worker >= 0:
        worker(args)
    else:
        launch(args)
