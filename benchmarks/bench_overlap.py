"""Two-micro-batch MoE step, whole calls vs split halves (issue: send/receive overlap).

Per rank and step: two micro-batches of T = M tokens, each dispatched (fp8), run
through a per-expert FFN (two matmuls over [LE, R*M, H]), and combined.
  compute: the two FFNs alone on rows of the same shape (no exchange): the floor.
  whole:   A: dispatch -> FFN -> combine, then B the same.
  split:   send A, send B; recv A, FFN A, combine-send A; recv B, FFN B, combine-send B;
           combine-recv A, combine-recv B  (each exchange waits while the other batch computes).
Per step inside one jitted fori_loop (median of --reps loops of --steps steps), for
each channel path (--paths: memory channels, forced port channels) and FFN width
(--ffn): the split can only hide what the exchange spends waiting for the peer's
data, which is more on the port path (the proxy's copy engine moves the data while
the SMs compute) than on NVLink stores made by the sending kernel itself.

  python benchmarks/bench_overlap.py [--m 128 --hidden 7168 --ffn 256,2048 --experts 32 --topk 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import jax_mscclpp_ep as ep  # noqa: E402

BF16 = jnp.bfloat16


def ffn(rows, scales, w1, w2):
    x = ep.dequantize(rows, scales).astype(BF16)
    h = jnp.einsum("erh,ehf->erf", x, w1, preferred_element_type=jnp.float32)
    return jnp.einsum("erf,efh->erh", jax.nn.gelu(h).astype(BF16), w2,
                      preferred_element_type=jnp.float32).astype(BF16)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--ffn", default="256,2048", help="FFN widths F to try")
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--paths", default="mem,port")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    devs = jax.devices()
    r, m, h, e, k = len(devs), a.m, a.hidden, a.experts, a.topk
    le = e // r
    mesh = Mesh(np.array(devs), ("ep",))
    cfg = ep.EPConfig(num_experts=e, max_tokens_per_rank=m, hidden=h)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, r, m, h)), BF16)
    idx = jnp.asarray(np.stack([[[rng.permutation(e)[:k] for _ in range(m)] for _ in range(r)]
                                for _ in range(2)]), jnp.int32)
    w = jnp.asarray(rng.random((2, r, m, k)), jnp.float32)
    rows = jnp.asarray(rng.standard_normal((2, r, le, r * m, h)), BF16)
    put = lambda v, s: jax.device_put(v, NamedSharding(mesh, s))
    dev = devs[0].device_kind
    results = {}
    for path in a.paths.split(","):
        bufs = [ep.Buffer(cfg, mesh=mesh, axis_name="ep", force_port=(path == "port"))
                for _ in range(2)]
        for f in (int(v) for v in a.ffn.split(",")):
            w1 = jnp.asarray(rng.standard_normal((r, le, h, f)) / np.sqrt(h), BF16)
            w2 = jnp.asarray(rng.standard_normal((r, le, f, h)) / np.sqrt(f), BF16)
            args = (put(x, P(None, "ep")), put(idx, P(None, "ep")), put(w, P(None, "ep")),
                    put(w1, P("ep")), put(w2, P("ep")), put(rows, P(None, "ep")))
            res = {name: _time(mesh, a, step, bufs, args)
                   for name, step in (("compute", _compute_step), ("whole", _whole_step),
                                      ("split", _split_step))}
            for b in bufs:
                b.check()
            results.setdefault(path, {})[f] = res
            print(f"{r}x {dev}, {path}, M=T={m} H={h} F={f} E={e} K={k}, two micro-batches per "
                  f"step (us/step): compute only {res['compute']:.1f}, whole {res['whole']:.1f}, "
                  f"split {res['split']:.1f}; speed-up {res['whole'] / res['split']:.3f}x, "
                  f"exchange overhead hidden {_hidden(res):.0%}", flush=True)
        for b in bufs:
            b.close()
    if a.out:
        with open(a.out + ".json", "w") as fh:
            json.dump(dict(vars(a), ranks=r, device=dev, us_per_step=results), fh, indent=1)


def _hidden(res):
    """Share of the whole step's exchange overhead (whole - compute) the split removed."""
    over = res["whole"] - res["compute"]
    return (res["whole"] - res["split"]) / over if over > 0 else 0.0


def _compute_step(bufs, xs, ids, ws, w1, w2, rows, order):
    del bufs, xs, ids, ws
    scales = jnp.ones(rows.shape[:-1] + (rows.shape[-1] // 128,), jnp.float32)
    # The barrier keeps XLA from computing only the element the loop reads.
    outs = [lax.optimization_barrier(ffn(rows[i], scales[i], w1, w2))[0] for i in range(2)]
    return outs, order


def _whole_step(bufs, xs, ids, ws, w1, w2, rows, order):
    del rows
    outs = []
    for i, buf in enumerate(bufs):
        res = ep.dispatch(xs[i], ids[i], buf, use_fp8=True, after=order)
        y = ffn(res.recv_x, res.recv_scales, w1, w2)
        out, order = ep.combine(y, ids[i], ws[i], res.handle, buf, return_order=True)
        outs.append(out)
    return outs, order


def _split_step(bufs, xs, ids, ws, w1, w2, rows, order):
    del rows
    buf_a, buf_b = bufs
    pa = ep.dispatch_send(xs[0], ids[0], buf_a, use_fp8=True, after=order)
    pb = ep.dispatch_send(xs[1], ids[1], buf_b, use_fp8=True, after=order)
    ra = ep.dispatch_recv(pa)
    qa = ep.combine_send(ffn(ra.recv_x, ra.recv_scales, w1, w2), ids[0], ws[0], ra.handle, buf_a)
    rb = ep.dispatch_recv(pb)
    qb = ep.combine_send(ffn(rb.recv_x, rb.recv_scales, w1, w2), ids[1], ws[1], rb.handle, buf_b)
    oa, order = ep.combine_recv(qa, return_order=True)
    ob, order_b = ep.combine_recv(qb, return_order=True)
    return [oa, ob], order + order_b * 0


def _time(mesh, a, step, bufs, args):
    """Median µs per step of `step` inside one jitted fori_loop."""
    def body_fn(xs, ids, ws, w1, w2, rows):
        xs, ids, ws, w1, w2, rows = xs[:, 0], ids[:, 0], ws[:, 0], w1[0], w2[0], rows[:, 0]

        def body(_, carry):
            acc, order = carry
            outs, order = step(bufs, xs, ids, ws, w1, w2, rows, order)
            return (acc + outs[0][0, 0].astype(jnp.float32) + outs[1][0, 0].astype(jnp.float32),
                    order)
        z = jnp.sum(ids[:0]).astype(jnp.int32)
        acc, _ = lax.fori_loop(0, a.steps, body, (z.astype(jnp.float32), z))
        return acc[None]
    spec = (P(None, "ep"), P(None, "ep"), P(None, "ep"), P("ep"), P("ep"), P(None, "ep"))
    fn = jax.jit(jax.shard_map(body_fn, mesh=mesh, in_specs=spec, out_specs=P("ep")))
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append((time.perf_counter() - t0) / a.steps * 1e6)
    return statistics.median(ts)


if __name__ == "__main__":
    main()
