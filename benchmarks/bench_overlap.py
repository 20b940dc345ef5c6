"""Two-micro-batch MoE step, whole calls vs split halves (issue: send/receive overlap).

Per rank and step: two micro-batches of T = M tokens, each dispatched (fp8), run
through a per-expert FFN (two matmuls over [LE, R*M, H]), and combined.
  whole: A: dispatch -> FFN -> combine, then B the same.
  split: send A, send B; recv A, FFN A, combine-send A; recv B, FFN B, combine-send B;
         combine-recv A, combine-recv B  (each exchange waits while the other batch computes).
Per step inside one jitted fori_loop (median of --reps loops of --steps steps).

  python benchmarks/bench_overlap.py [--m 128 --hidden 7168 --ffn 2048 --experts 256 --topk 8]
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
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    devs = jax.devices()
    r, m, h, f, e, k = len(devs), a.m, a.hidden, a.ffn, a.experts, a.topk
    le = e // r
    mesh = Mesh(np.array(devs), ("ep",))
    cfg = ep.EPConfig(num_experts=e, max_tokens_per_rank=m, hidden=h)
    buf_a = ep.Buffer(cfg, mesh=mesh, axis_name="ep")
    buf_b = ep.Buffer(cfg, mesh=mesh, axis_name="ep")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, r, m, h)), BF16)
    idx = jnp.asarray(np.stack([[[rng.permutation(e)[:k] for _ in range(m)] for _ in range(r)]
                                for _ in range(2)]), jnp.int32)
    w = jnp.asarray(rng.random((2, r, m, k)), jnp.float32)
    w1 = jnp.asarray(rng.standard_normal((r, le, h, f)) / np.sqrt(h), BF16)
    w2 = jnp.asarray(rng.standard_normal((r, le, f, h)) / np.sqrt(f), BF16)

    def whole_step(xs, ids, ws, w1, w2, order):
        outs = []
        for i, buf in ((0, buf_a), (1, buf_b)):
            res = ep.dispatch(xs[i], ids[i], buf, use_fp8=True, after=order)
            y = ffn(res.recv_x, res.recv_scales, w1, w2)
            out, order = ep.combine(y, ids[i], ws[i], res.handle, buf, return_order=True)
            outs.append(out)
        return outs, order

    def split_step(xs, ids, ws, w1, w2, order):
        pa = ep.dispatch_send(xs[0], ids[0], buf_a, use_fp8=True, after=order)
        pb = ep.dispatch_send(xs[1], ids[1], buf_b, use_fp8=True, after=order)
        ra = ep.dispatch_recv(pa)
        qa = ep.combine_send(ffn(ra.recv_x, ra.recv_scales, w1, w2), ids[0], ws[0], ra.handle, buf_a)
        rb = ep.dispatch_recv(pb)
        qb = ep.combine_send(ffn(rb.recv_x, rb.recv_scales, w1, w2), ids[1], ws[1], rb.handle, buf_b)
        oa, order = ep.combine_recv(qa, return_order=True)
        ob, order_b = ep.combine_recv(qb, return_order=True)
        return [oa, ob], order + order_b * 0

    def looped(step):
        def body_fn(xs, ids, ws, w1, w2):
            xs, ids, ws, w1, w2 = xs[:, 0], ids[:, 0], ws[:, 0], w1[0], w2[0]

            def body(_, carry):
                acc, order = carry
                outs, order = step(xs, ids, ws, w1, w2, order)
                return acc + outs[0][0, 0].astype(jnp.float32) + outs[1][0, 0].astype(jnp.float32), order
            z = jnp.sum(ids[:0]).astype(jnp.int32)
            acc, _ = lax.fori_loop(0, a.steps, body, (z.astype(jnp.float32), z))
            return acc[None]
        spec = (P(None, "ep"), P(None, "ep"), P(None, "ep"), P("ep"), P("ep"))
        return jax.jit(jax.shard_map(body_fn, mesh=mesh, in_specs=spec, out_specs=P("ep")))

    put = lambda v, s: jax.device_put(v, NamedSharding(mesh, s))
    args = (put(x, P(None, "ep")), put(idx, P(None, "ep")), put(w, P(None, "ep")),
            put(w1, P("ep")), put(w2, P("ep")))
    res = {}
    for name, step in (("whole", whole_step), ("split", split_step)):
        fn = looped(step)
        jax.block_until_ready(fn(*args))
        ts = []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            ts.append((time.perf_counter() - t0) / a.steps * 1e6)
        res[name] = statistics.median(ts)
        buf_a.check()
        buf_b.check()
    dev = devs[0].device_kind
    line = (f"{r}x {dev}, M=T={m} H={h} F={f} E={e} K={k}, two micro-batches per step: "
            f"whole {res['whole']:.1f} us/step, split {res['split']:.1f} us/step, "
            f"speed-up {res['whole'] / res['split']:.3f}x")
    print(line)
    if a.out:
        with open(a.out + ".json", "w") as fh:
            json.dump(dict(vars(a), ranks=r, device=dev, us_per_step=res), fh, indent=1)
    buf_a.close()
    buf_b.close()


if __name__ == "__main__":
    main()
