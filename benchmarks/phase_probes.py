"""Where an LL call's time goes: per-phase timestamps from inside the kernels.

Needs a build with the probes compiled in:
  CMAKE_ARGS="-DCMAKE_CUDA_FLAGS=-DJMEP_LL_PROBES" python3 -m pip install --no-build-isolation .
Runs a jitted loop of dispatch(fp8) + combine steps per shape and prints, for each
kernel, the mean time (µs, from block 0's first instruction) at which the last block
passed each phase probe:
  dispatch: 0 all blocks running (since issue 14: messages counted, first slots claimed),
            1 tokens sent (with their counts), 2 counts published, 3 rows received
  combine:  0 all blocks running, 1 rows sent + flags, 2 tokens reduced, 3 every flag seen
then the last thread at each event probe (no barrier):
  dispatch: 4 a signal add begins, 5 it returned, 6 a count with rows seen, 7 a row copied
  combine:  4 a flag add begins, 5 it returned, 6 a token's flag seen, 7 a token reduced
  both:     8 the state read returned (last block), 12 the call's start mark (t_start)
  dispatch: 9 a message's stores issued (warp 0), 10 a count laid out, 11 a row's token id in
  combine:  9 a row's token id in (send), 10 a reduce starts, 11 its first loads in
and segments (13..: SM cycles of one warp between two of its points, the most any warp
spent; named in PROBES).
plus the kernel's total (to its last block's end).

  python3 benchmarks/phase_probes.py [--shapes "T,H,K,E[,M];..."] [--steps 200]
(M, the Buffer's tokens per rank, defaults to T; bench_latency uses M = 128.)
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import jax_mscclpp_ep as ep  # noqa: E402
from jax_mscclpp_ep.native import ext as _ep  # noqa: E402

PROBES = {"dispatch": ("running", "tokens sent", "counts published", "rows received",
                       "| add begins", "add returned", "count seen", "row copied",
                       "state read", "stores issued", "counts laid out", "token id in",
                       "t_start", "| cycles: seen->laid out", "laid out->id in",
                       "id in->row stored", "recv start->seen", "state->claimed",
                       "claimed->counted", "counted->stored"),
          "combine": ("running", "rows sent", "tokens reduced", "flags seen",
                      "| add begins", "add returned", "flag seen", "reduced",
                      "state read", "token id in", "reduce starts", "first loads in",
                      "t_start", "| cycles: state->id in", "id in->row stored",
                      "state->add returned", "recv start->flags seen", "flags seen->reduced",
                      "state->all flags seen")}


def run_shape(mesh, t, h, k, e, m, steps, force_port):
    r = mesh.size
    rng = np.random.default_rng(0)
    x = rng.standard_normal((r, t, h)).astype(jnp.bfloat16)
    idx = np.stack([np.stack([rng.permutation(e)[:k] for _ in range(t)]) for _ in range(r)])
    w = rng.uniform(0.1, 1.0, (r, t, k)).astype(np.float32)
    put = lambda a: jax.device_put(np.asarray(a), NamedSharding(mesh, P("ep")))
    buf = ep.Buffer(ep.EPConfig(e, m, h), mesh=mesh, axis_name="ep", force_port=force_port)

    def body(xs, ids, ws):
        xs, ids, ws = xs[0], ids[0], ws[0]

        def step(_, carry):
            acc, order = carry
            res = ep.dispatch(xs, ids, buf, use_fp8=True, after=order)
            y = ep.dequantize(res.recv_x, res.recv_scales).astype(jnp.bfloat16)
            out, order = ep.combine(y, ids, ws, res.handle, buf, return_order=True)
            return acc + out[0, 0].astype(jnp.float32), order
        z = jnp.sum(ids[:0]).astype(jnp.int32)
        acc, _ = lax.fori_loop(0, steps, step, (z.astype(jnp.float32), z))
        return acc[None]
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
    args = (put(x), put(idx.astype(np.int32)), put(w))
    jax.block_until_ready(f(*args))
    devs = buf._device_state.devices
    for d in devs:
        _ep.ll_timing(buf.id, d, True)
    jax.block_until_ready(f(*args))
    rows = [list(_ep.ll_timing(buf.id, d, False)) for d in devs]
    buf.close()
    out = {}
    n = (len(rows[0]) - 6) // 2  # probes per kernel (ll_timing: 6 words, then both kernels')
    for kind, (ci, pi) in (("dispatch", (0, 6)), ("combine", (3, 6 + n))):
        calls = sum(rw[ci] for rw in rows)
        if n < 4 or not calls:
            return None
        total = sum(rw[ci + 2] for rw in rows) / calls / 1e3
        probes = [sum(rw[pi + i] for rw in rows) / calls / 1e3 for i in range(n)]
        if n > 12:  # probes count from block 0's first instruction, the total from t_start
            total += probes[12]
        out[kind] = (probes, total)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1,7168,8,8;1,7168,8,256;128,7168,8,256")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--force-port", action="store_true")
    a = ap.parse_args()
    mesh = Mesh(np.array(jax.devices()), ("ep",))
    print(f"{mesh.size}x {jax.devices()[0].device_kind}, µs from block 0's first instruction")
    for spec in a.shapes.split(";"):
        t, h, k, e, *m = map(int, spec.split(","))
        m = m[0] if m else t
        res = run_shape(mesh, t, h, k, e, m, a.steps, a.force_port)
        if res is None:
            print("no probe data: build with -DJMEP_LL_PROBES (see the docstring)")
            return
        for kind, (probes, total) in res.items():
            # probes 13..: segment cycles (max over warps), printed as cycles
            cells = ", ".join(f"{n} {v * 1e3:.0f}" if i >= 13 else f"{n} {v:.1f}"
                              for i, (n, v) in enumerate(zip(PROBES[kind], probes)))
            print(f"T={t} M={m} H={h} K={k} E={e} {kind:8s}: {cells}; end {total:.1f}")


if __name__ == "__main__":
    main()
