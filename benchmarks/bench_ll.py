"""LL dispatch/combine benchmark on the GPUs of one host (one process drives them all).

Compares this project's kernels (memory-channel and forced port-channel paths)
with the jax.lax.ragged_all_to_all pipeline a JAX user writes today (routing
sort + size exchange + ragged exchange, and its reverse).

For each system and shape it reports, in microseconds:
  *_call: one jitted call from Python, to block_until_ready (median of --calls);
  *_loop: per step inside one jitted lax.fori_loop of --steps steps
          (loop time / steps; median over --reps loops).
Writes the printed table and a JSON next to each other (--out, without suffix).

--sweep-tokens T1,T2,...: latency vs tokens per rank. For the first shape of
--shapes, buffers stay sized for its M while each step routes only T tokens per
rank; dispatch and combine are timed per step inside one jitted loop (as *_loop)
for every T. Stored under "sweep" in the JSON; --plot PNG draws it (plot_ll.py).

  python benchmarks/bench_ll.py --out benchmarks/results/ll_h200x2
  python benchmarks/bench_ll.py --shapes 128,7168,8,256 --sweep-tokens 1,2,4,8,16,32,64,128 \
      --sweep-only --out benchmarks/results/ll_sweep --plot benchmarks/results/ll_sweep.png
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import jax_mscclpp_ep as ep  # noqa: E402

BF16, F32 = jnp.bfloat16, jnp.float32


def parse():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="128,7168,8,256;128,4096,8,64",
                    help="M,H,K,E;... (T = M)")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--unroll", type=int, default=10, help="fori_loop unroll (fewer loop trips)")
    ap.add_argument("--systems", default="mem-fp8,mem-bf16,port-fp8,ragged-bf16")
    ap.add_argument("--out", default="")
    ap.add_argument("--platform", default="gpu", help="cpu: dry run of the harness (reference path)")
    ap.add_argument("--sweep-tokens", default="",
                    help="T1,T2,...: also time dispatch/combine per step for these tokens per rank "
                         "(each <= M) at the first shape's M; empty = no sweep")
    ap.add_argument("--sweep-only", action="store_true",
                    help="run only the token sweep, not the per-shape table")
    ap.add_argument("--plot", default="", help="PNG: plot the token sweep here (needs matplotlib)")
    a = ap.parse_args()
    # check the sweep options now, not after the table has run
    a.sweep = []
    if a.sweep_tokens:
        m = int(a.shapes.split(";")[0].split(",")[0])
        try:
            a.sweep = [int(t) for t in a.sweep_tokens.split(",")]
        except ValueError:
            ap.error(f"--sweep-tokens must be comma-separated integers, got {a.sweep_tokens!r}")
        bad = [t for t in a.sweep if not 1 <= t <= m]
        if bad:
            ap.error(f"--sweep-tokens {bad}: each T must be in [1, M={m}] (M of the first shape)")
    if (a.sweep_only or a.plot) and not a.sweep:
        ap.error("--sweep-only and --plot need --sweep-tokens")
    return a


# ---------------------------------------------------------------- timing helpers

def time_calls(f, args, n):
    jax.block_until_ready(f(*args))  # compile + warm
    for _ in range(5):
        jax.block_until_ready(f(*args))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def time_loop(f, args, steps, reps):
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append((time.perf_counter() - t0) / steps)
    return statistics.median(ts) * 1e6


# ---------------------------------------------------------------- inputs

def host_inputs(r, m, h, k, e, seed=0, routing="random"):
    """x, topk_idx, topk_weights, y on the host, leading axis = rank. routing "random":
    K distinct experts per token at random; "balanced": token t of every rank takes experts
    (t * K + k) % E, so any T * K / E tokens' messages spread evenly over the experts."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((r, m, h))).astype(jnp.bfloat16)
    if routing == "balanced":
        idx = np.broadcast_to((np.arange(m)[:, None] * k + np.arange(k)) % e, (r, m, k))
    elif routing == "random":
        idx = np.stack([np.stack([rng.permutation(e)[:k] for _ in range(m)]) for _ in range(r)])
    else:
        raise ValueError(f"routing must be 'random' or 'balanced', got {routing!r}")
    w = rng.uniform(0.1, 1.0, (r, m, k)).astype(np.float32)
    le = e // r
    y = rng.standard_normal((r, le, r * m, h)).astype(jnp.bfloat16)
    return x, idx.astype(np.int32), w, y


def put(mesh, *arrays):
    sh = NamedSharding(mesh, P("ep"))
    return [jax.device_put(np.ascontiguousarray(a), sh) for a in arrays]


def add_one_gpu_args(ap, tokens="1,128"):
    """The options the single-GPU latency benchmarks share (see one_gpu_buffer)."""
    ap.add_argument("--shape", default="128,7168,8,256", help="M,H,K,E")
    ap.add_argument("--tokens", default=tokens)
    ap.add_argument("--steps", type=int, default=120, help="profiled steps per loop")
    ap.add_argument("--out", default="", help="write OUT.json")


def one_gpu_buffer(script, a, routing="random", timeout_s=10.0):
    """one_gpu_setup for add_one_gpu_args' options, plus a Buffer of that shape:
    (gpu, mesh, host (x, idx, w), y, buf, (M, H, K, E))."""
    m, h, k, e = map(int, a.shape.split(","))
    gpu, mesh, host, y = one_gpu_setup(script, m, h, k, e, routing)
    buf = ep.Buffer(ep.EPConfig(e, m, h), mesh=mesh, timeout_s=timeout_s)
    return gpu, mesh, host, y, buf, (m, h, k, e)


def median(xs):
    """Median of a list of durations, rounded to 0.01 us; None for an empty list."""
    return round(statistics.median(xs), 2) if xs else None


def add_row(buf, rows, row):
    """Check the Buffer (a device-side error raises here), keep the row and print it."""
    buf.check()
    rows.append(row)
    print(json.dumps(row), flush=True)


def write_rows(a, gpu, shape, rows, **extra):
    """A single-GPU latency benchmark's rows as a.out + ".json" (when --out is given)."""
    if not a.out:
        return
    m, h, k, e = shape
    with open(a.out + ".json", "w") as f:
        json.dump({"device_kind": gpu.device_kind, "jax": jax.__version__,
                   "shape": {"M": m, "H": h, "K": k, "E": e, "R": 1}, **extra, "rows": rows},
                  f, indent=1)


def one_gpu_setup(script, m, h, k, e, routing="random"):
    """(the GPU, its one-device mesh, host x/topk_idx/weights [1, M, ...], y on the GPU) for
    the single-GPU (R = 1) latency benchmarks."""
    gpus = [d for d in jax.devices() if d.platform == "gpu"][:1]
    if not gpus:
        raise SystemExit(f"{script} needs a GPU")
    mesh = Mesh(np.array(gpus), ("ep",))
    hx, hidx, hw, hy = host_inputs(1, m, h, k, e, routing=routing)
    (y,) = put(mesh, hy)
    return gpus[0], mesh, (hx, hidx, hw), y


def inputs(mesh, r, m, h, k, e, seed=0):
    return put(mesh, *host_inputs(r, m, h, k, e, seed))


def varying(a, like):
    """a, typed as varying over the EP axis like `like` (fori_loop carries must match)."""
    return a + jnp.sum(like[:0]).astype(a.dtype)


def smap(mesh, fn):
    def body(*a):
        out = fn(*[v[0] for v in a])
        return jax.tree.map(lambda o: o[None], out)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))


# ---------------------------------------------------------------- this project

def ours(mesh, buf, fp8, steps, unroll=1):
    le = buf.config.num_experts // buf.num_ranks

    def disp(x, idx):
        res = ep.dispatch(x, idx, buf, use_fp8=fp8)
        return res.recv_count, res.handle.src_info, res.handle.layout_range, res.handle.order

    def comb(y, idx, w, src, lr):
        h = ep.DispatchHandle(src, lr, jnp.zeros((), jnp.int32))
        return ep.combine(y, idx, w, h, buf)

    def step(x, idx, w, y):
        res = ep.dispatch(x, idx, buf, use_fp8=fp8)
        return ep.combine(y, idx, w, res.handle, buf)

    def disp_loop(x, idx):
        def body(i, c):
            order, stats = c
            res = ep.dispatch(x, idx, buf, use_fp8=fp8, stats=stats, after=order)
            return res.handle.order, res.stats
        return lax.fori_loop(0, steps, body, unroll=unroll, init_val=(varying(jnp.zeros((), jnp.int32), idx),
                                             varying(jnp.zeros((le,), jnp.int32), idx)))[1]

    def comb_loop(y, idx, w, src, lr):
        def body(i, order):
            _, order = ep.combine(y, idx, w, ep.DispatchHandle(src, lr, order), buf,
                                  return_order=True)
            return order
        return lax.fori_loop(0, steps, body, unroll=unroll, init_val=varying(jnp.zeros((), jnp.int32), idx))[None]

    def step_loop(x, idx, w, y):
        def body(i, c):
            order, stats = c
            res = ep.dispatch(x, idx, buf, use_fp8=fp8, stats=stats, after=order)
            _, order = ep.combine(y, idx, w, res.handle, buf, return_order=True)
            return order, res.stats
        return lax.fori_loop(0, steps, body, unroll=unroll, init_val=(varying(jnp.zeros((), jnp.int32), idx),
                                             varying(jnp.zeros((le,), jnp.int32), idx)))[1]

    fs = {k: smap(mesh, v) for k, v in dict(disp=disp, comb=comb, step=step, disp_loop=disp_loop,
                                             comb_loop=comb_loop, step_loop=step_loop).items()}

    def comb_args(x, idx, w, y):
        _, src, lr, _ = fs["disp"](x, idx)
        return (y, idx, w, src, lr)
    fs["comb_args"] = comb_args
    return fs


# ---------------------------------------------------------------- ragged_all_to_all baseline

def ragged(mesh, r, m, h, k, e, steps, unroll=1):
    """The pipeline a JAX user writes with lax.ragged_all_to_all today (bf16).

    T (tokens routed per rank) comes from the inputs' shape; the receive
    capacity stays sized for M, like a buffer fixed at the largest batch.
    """
    le = e // r
    cap = r * m * k  # receive capacity: every (token, slot) of every rank

    def route(idx):
        flat = idx.reshape(-1)
        key = jnp.where(flat >= 0, flat, e)
        order = jnp.argsort(key)                       # routing sort by expert
        dest = jnp.where(key[order] < e, key[order] // le, r)
        send_sizes = jnp.sum(dest[None, :] == jnp.arange(r)[:, None], axis=1).astype(jnp.int32)
        in_off = (jnp.cumsum(send_sizes) - send_sizes).astype(jnp.int32)
        recv_sizes = lax.all_to_all(send_sizes, "ep", 0, 0, tiled=True)        # size exchange
        my_out_off = (jnp.cumsum(recv_sizes) - recv_sizes).astype(jnp.int32)
        out_off = lax.all_to_all(my_out_off, "ep", 0, 0, tiled=True)
        return order, send_sizes, in_off, recv_sizes, my_out_off, out_off

    def dispatch(x, idx):
        order, ss, io, rs, mo, oo = route(idx)
        rows = x[order // k]
        out = jnp.zeros((cap, h), x.dtype)
        recv = lax.ragged_all_to_all(rows, out, io, ss, oo, rs, axis_name="ep")
        return recv, (order, ss, io, rs, mo, oo)

    def combine(recv, idx, w, route_info):
        order, ss, io, rs, mo, oo = route_info
        t = idx.shape[0]
        back = jnp.zeros((t * k, h), recv.dtype)
        # reverse: send what we received back to where it came from
        oo_back = lax.all_to_all(io, "ep", 0, 0, tiled=True)
        got = lax.ragged_all_to_all(recv, back, mo, rs, oo_back, ss, axis_name="ep")
        unsorted = jnp.zeros_like(got).at[order].set(got)
        wk = jnp.where(idx >= 0, w, 0.0).reshape(-1, 1)
        return (unsorted.astype(F32) * wk).reshape(t, k, h).sum(1).astype(BF16)

    def disp(x, idx):
        recv, info = dispatch(x, idx)
        return (recv,) + info

    def comb(recv, idx, w, *info):
        return combine(recv, idx, w, info)

    def step(x, idx, w, y):
        recv, info = dispatch(x, idx)
        return combine(recv, idx, w, info)

    def disp_loop(x, idx):
        def body(i, acc):
            recv, _ = dispatch(x + acc.astype(BF16), idx)
            return acc + recv[0, 0].astype(F32) * 0
        return lax.fori_loop(0, steps, body, unroll=unroll, init_val=varying(jnp.zeros((), F32), idx))[None]

    def comb_loop(recv, idx, w, *info):
        def body(i, acc):
            out = combine(recv + acc.astype(BF16), idx, w, info)
            return acc + out[0, 0].astype(F32) * 0
        return lax.fori_loop(0, steps, body, unroll=unroll, init_val=varying(jnp.zeros((), F32), idx))[None]

    def step_loop(x, idx, w, y):
        def body(i, xx):
            return step(xx, idx, w, y) * jnp.asarray(0.5, BF16)
        return lax.fori_loop(0, steps, body, unroll=unroll, init_val=x)

    fs = {k_: smap(mesh, v) for k_, v in dict(disp=disp, comb=comb, step=step, disp_loop=disp_loop,
                                               comb_loop=comb_loop, step_loop=step_loop).items()}
    fs["comb_args"] = lambda x, idx, w, y: (lambda o: (o[0], idx, w) + tuple(o[1:]))(fs["disp"](x, idx))
    return fs


# ---------------------------------------------------------------- main

def system_fns(a, mesh, bufs, kind, dtype, r, m, h, k, e):
    """The jitted functions of one system; our systems share a Buffer per path in ``bufs``."""
    if kind == "ragged":
        return ragged(mesh, r, m, h, k, e, a.steps, a.unroll)
    if kind not in bufs:
        bufs[kind] = ep.Buffer(ep.EPConfig(e, m, h), mesh=mesh, force_port=(kind == "port"),
                               timeout_s=5.0)
    return ours(mesh, bufs[kind], dtype == "fp8", a.steps, a.unroll)


def main():
    a = parse()
    gpus = sorted(jax.devices(a.platform), key=lambda d: d.id)[:2 if a.platform == "cpu" else None]
    r = len(gpus)
    mesh = Mesh(np.array(gpus), ("ep",))
    from jax_mscclpp_ep import env
    p2p = env.p2p()
    results = {"devices": [str(d) for d in gpus], "mem_transport": "p2p" if p2p else "channels", "device_kind": gpus[0].device_kind,
               "jax": jax.__version__, "host": platform.node(), "calls": a.calls,
               "steps": a.steps, "reps": a.reps, "shapes": {}}
    for spec in ([] if a.sweep_only else a.shapes.split(";")):
        m, h, k, e = map(int, spec.split(","))
        name = f"M=T={m} H={h} K={k} E={e} R={r}"
        x, idx, w, y = inputs(mesh, r, m, h, k, e)
        res = {}
        bufs = {}
        for system in a.systems.split(","):
            kind, dtype = system.split("-")
            try:
                fs = system_fns(a, mesh, bufs, kind, dtype, r, m, h, k, e)
                cargs = fs["comb_args"](x, idx, w, y)
                row = {}
                row["dispatch_call"] = time_calls(fs["disp"], (x, idx), a.calls)
                row["combine_call"] = time_calls(fs["comb"], cargs, a.calls)
                row["step_call"] = time_calls(fs["step"], (x, idx, w, y), a.calls)
                row["dispatch_loop"] = time_loop(fs["disp_loop"], (x, idx), a.steps, a.reps)
                row["combine_loop"] = time_loop(fs["comb_loop"], cargs, a.steps, a.reps)
                row["step_loop"] = time_loop(fs["step_loop"], (x, idx, w, y), a.steps, a.reps)
                if kind != "ragged" and bufs[kind]._device_state is not None:
                    # kernel times (device %globaltimer) from one more step loop
                    st = bufs[kind]._device_state
                    jax.block_until_ready(fs["step_loop"](x, idx, w, y))
                    st.timing(reset=True)
                    jax.block_until_ready(fs["step_loop"](x, idx, w, y))
                    row.update(st.timing(reset=True))
                if kind != "ragged":
                    bufs[kind].check()
            except Exception as ex:  # noqa: BLE001 - keep the other systems' numbers
                row = {"error": f"{type(ex).__name__}: {ex}".replace("\n", " ")[:500]}
            res[system] = row
            results["shapes"][name] = res
            render(a, results, gpus, r)
            print(name, system, json.dumps({k_: (round(v, 1) if isinstance(v, float) else v)
                                            for k_, v in row.items()}), flush=True)
        for b in bufs.values():
            b.close()
    if a.sweep:
        sweep(a, mesh, r, results, gpus)
    print(render(a, results, gpus, r))
    if a.plot:
        plot_sweep(a, results)


def sweep(a, mesh, r, results, gpus):
    """Per-step dispatch and combine loop times vs tokens per rank T, at the first
    shape's M: one buffer per system sized for M, only the first T rows routed."""
    m, h, k, e = map(int, a.shapes.split(";")[0].split(","))
    hx, hidx, hw, hy = host_inputs(r, m, h, k, e)
    (y,) = put(mesh, hy)  # expert outputs are [LE, R*M, H] whatever T is
    xs = {t: put(mesh, hx[:, :t], hidx[:, :t], hw[:, :t]) for t in a.sweep}
    sw = results["sweep"] = {"shape": {"M": m, "H": h, "K": k, "E": e, "R": r}, "tokens": a.sweep,
                             "steps": a.steps, "reps": a.reps, "unroll": a.unroll, "systems": {}}
    bufs = {}
    for system in a.systems.split(","):
        kind, dtype = system.split("-")
        row = sw["systems"][system] = {"dispatch_us": [], "combine_us": []}
        try:
            # one set of jitted functions per system; each T retraces (one compile per shape)
            fs = system_fns(a, mesh, bufs, kind, dtype, r, m, h, k, e)
            for t in a.sweep:
                x, idx, w = xs[t]
                cargs = fs["comb_args"](x, idx, w, y)
                row["dispatch_us"].append(time_loop(fs["disp_loop"], (x, idx), a.steps, a.reps))
                row["combine_us"].append(time_loop(fs["comb_loop"], cargs, a.steps, a.reps))
                render(a, results, gpus, r)
                print(f"sweep M={m} T={t}", system, json.dumps(
                    {"dispatch_us": round(row["dispatch_us"][-1], 1),
                     "combine_us": round(row["combine_us"][-1], 1)}), flush=True)
            if kind != "ragged":
                bufs[kind].check()
        except Exception as ex:  # noqa: BLE001 - keep the other systems' numbers
            # a failed buffer is poisoned: skip this system's remaining T, keep the lists aligned
            row["error"] = f"{type(ex).__name__}: {ex}".replace("\n", " ")[:500]
            for key in ("dispatch_us", "combine_us"):
                row[key] += [None] * (len(a.sweep) - len(row[key]))
            print(f"sweep M={m}", system, json.dumps({"error": row["error"]}), flush=True)
        render(a, results, gpus, r)
    for b in bufs.values():
        b.close()


def plot_sweep(a, results):
    """--plot: draw the sweep with plot_ll.py, or say where to do it without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        src = a.out + ".json" if a.out else "RESULTS.json (write it with --out)"
        print(f"note: matplotlib is not installed here, no plot; run "
              f"`python benchmarks/plot_ll.py {src} {a.plot}` where it is", flush=True)
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # plot_ll.py lives next to us
    import plot_ll
    plot_ll.plot(results, a.plot)
    print(f"wrote {a.plot}", flush=True)


def render(a, results, gpus, r):
    """Print the table and write the .md/.json (also after every system, so a
    time-limited run keeps what it measured)."""
    lines = []
    cols = ["dispatch_call", "combine_call", "step_call", "dispatch_loop", "combine_loop",
            "step_loop", "dispatch_kernel", "combine_kernel"]
    for name, res in results["shapes"].items():
        lines.append(f"\n### {name}\n")
        lines.append("| system | " + " | ".join(c.replace("_", " ") + " (µs)" for c in cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for system, row in res.items():
            if "error" in row:
                lines.append(f"| {system} | error: {row['error'][:120]} |" + " |" * (len(cols) - 1))
                continue
            cells = [f"{row[c]:.1f}" if c in row else "–" for c in cols]
            lines.append(f"| {system} | " + " | ".join(cells) + " |")
    sw = results.get("sweep")
    if sw:
        sh = sw["shape"]
        lines.append(f"\n### Token sweep: M={sh['M']} H={sh['H']} K={sh['K']} E={sh['E']} R={sh['R']}, "
                     "dispatch / combine loop (µs per step)\n")
        names = list(sw["systems"])
        lines.append("| T | " + " | ".join(names) + " |")
        lines.append("|---|" + "---|" * len(names))
        for i, t in enumerate(sw["tokens"]):
            cells = []
            for row in sw["systems"].values():
                d, c = (row[key][i] if i < len(row[key]) else None
                        for key in ("dispatch_us", "combine_us"))
                cells.append(" / ".join(f"{v:.1f}" if v is not None else "–" for v in (d, c)))
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
        for name, row in sw["systems"].items():
            if "error" in row:
                lines.append(f"\n{name}: error: {row['error'][:200]}")
    table = "\n".join(lines)
    head = (f"# LL dispatch/combine on {r}x {gpus[0].device_kind} (jax {jax.__version__})\n\n"
            f"*_call: median of {a.calls} jitted calls from Python (to block_until_ready); "
            f"*_loop: per step inside one jitted fori_loop of {a.steps} steps, median of {a.reps} "
            f"loops (unroll {a.unroll}); *_kernel: mean kernel time on the GPU (%globaltimer, first "
            "block start to last block end, incl. waiting for the peer) inside the step loop. "
            "mem = memory channels (NVLink), port = forced port channels (proxy), "
            "ragged = lax.ragged_all_to_all pipeline; fp8 = fp8 dispatch + bf16 combine. "
            f"mem transport: {results['mem_transport']} (p2p = direct CUDA peer access "
            "fallback without the channel layer).\n")
    if results.get("sweep"):
        head += ("\nToken sweep: buffers sized for the first shape's M, each step routes T tokens per "
                 "rank (x/topk_idx of T rows; y stays [LE, R*M, H]; ragged keeps its R*M*K receive "
                 "capacity); dispatch and combine timed like *_loop.\n")
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out + ".md", "w") as f:
            f.write(head + table + "\n")
        with open(a.out + ".json", "w") as f:
            json.dump(results, f, indent=1)
    return head + table


if __name__ == "__main__":
    main()
