"""A decoding loop whose step is one jitted, fixed-shape program (CUDA-graph friendly).

Every step runs the same compiled program on the same persistent buffer:
shapes never change (a fixed batch of slots; finished sequences are masked
with token_mask, so they send nothing), and the order token returned by each
step's combine is fed to the next step's dispatch, so the exchanges on the
buffer run in the same order on every rank. The same loop also runs as one
lax.scan (one program for all steps). Both are checked against the dense model.

    python examples/decode_loop.py [--steps 16] [--gpu]
"""

import argparse
import os
import sys

if "--gpu" not in sys.argv:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

import jax_mscclpp_ep as ep
from jax_mscclpp_ep import moe


def rmsnorm(x):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--slots", type=int, default=16, help="decode slots (tokens) per rank")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--gpu", action="store_true")
    a = ap.parse_args(argv)

    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("ep",))
    r, t, h, e, k = len(devices), a.slots, a.hidden, a.experts, a.topk
    buf = ep.Buffer(ep.EPConfig(e, t, h), mesh=mesh)     # created once, reused by every step
    seed = int.from_bytes(os.urandom(4), "little")
    kp, kx, kl = jax.random.split(jax.random.key(seed), 3)
    params = moe.init_params(kp, h, 2 * h, e)
    h0 = jax.random.normal(kx, (r * t, h), jnp.float32)
    # sequence s stops after length[s] steps; its slot stays in the batch, masked
    length = jax.random.randint(kl, (r * t,), 1, a.steps + 1)
    print(f"{r} x {devices[0].platform}; {r * t} slots, {a.steps} steps, seed={seed}")

    def layer(p, hs, live, order):
        out, order = moe.moe_layer(p, rmsnorm(hs).astype(jnp.bfloat16), buf, top_k=k,
                                   token_mask=live, after=order, return_order=True)
        return hs + out.astype(jnp.float32), order

    def one_step(p, hs, lens, step, order):
        return layer(p, hs, step < lens, order)

    specs = moe.param_specs()
    shard = lambda f, n_out: jax.jit(jax.shard_map(
        f, mesh=mesh, in_specs=(specs, P("ep"), P("ep"), P(), P("ep")),
        out_specs=(P("ep"), P("ep")) if n_out == 2 else P("ep")))

    # (1) a Python loop over one compiled step; the order token is carried per rank
    step_fn = shard(lambda p, hs, lens, s, o: (lambda r_: (r_[0], r_[1][None]))(
        one_step(p, hs, lens, s, o[0])), 2)
    put = lambda v: jax.device_put(v, jax.sharding.NamedSharding(mesh, P("ep")))
    hs, order, lens = put(h0), put(jnp.zeros((r,), jnp.int32)), put(length)  # steady shardings
    states = [np.asarray(h0)]
    for s in range(a.steps):
        hs, order = step_fn(params, hs, lens, jnp.int32(s), order)
        states.append(np.asarray(hs))   # (also waits: in-flight steps can starve XLA:CPU)
    loop_out = states[-1]
    print(f"python loop: {a.steps} calls of one program (compiled "
          f"{step_fn._cache_size() if hasattr(step_fn, '_cache_size') else '?'} time(s))")

    # (2) all steps in one lax.scan
    def scanned(p, hs, lens, _, o):
        def body(carry, s):
            hs, o = carry
            return one_step(p, hs, lens, s, o), None
        return jax.lax.scan(body, (hs, o[0]), jnp.arange(a.steps))[0][0]

    scan_out = np.asarray(shard(scanned, 1)(params, h0, length, jnp.int32(0),
                                            jnp.zeros((r,), jnp.int32)))

    # dense reference, step by step from the same state (so a near-tie in the router,
    # decided differently after tiny rounding differences, cannot compound over steps)
    dense = jax.jit(lambda p, hs, live: hs + moe.moe_dense(
        p, rmsnorm(hs).astype(jnp.bfloat16), top_k=k, token_mask=live).astype(jnp.float32))
    err_loop = 0.0
    for s in range(a.steps):
        want = np.asarray(dense(params, states[s], s < length))
        err_loop = max(err_loop, np.abs(states[s + 1] - want).max() / np.abs(want).max())
    err_scan = np.abs(scan_out - loop_out).max() / np.abs(loop_out).max()
    live = np.asarray(length)[None, :] > np.arange(a.steps)[:, None]
    print(f"live slots per step: {live.sum(1).tolist()}")
    print(f"max rel |step - dense step| = {err_loop:.2e}, |scan - loop| = {err_scan:.2e}")
    buf.close()
    if not (err_loop < 2e-2 and err_scan < 1e-5):
        print("FAILED: decode loop differs from the dense model")
        return 1
    print("OK: decode loop matches the dense model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
