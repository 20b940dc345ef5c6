"""Quickstart: dispatch -> experts -> combine inside jit(shard_map), then a gradient.

    python examples/quickstart.py [--gpu]

On CPU it uses 8 virtual devices (the pure-JAX reference path); with --gpu
the visible GPUs (one process driving them all) and the CUDA kernels.
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per rank")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=4)
    a = ap.parse_args(argv)

    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("ep",))                  # one EP rank per device
    r, t, h, e, k = len(devices), a.tokens, a.hidden, a.experts, a.topk
    # 1. A persistent buffer for the EP group (every rank: same M, H, E).
    buf = ep.Buffer(ep.EPConfig(num_experts=e, max_tokens_per_rank=t, hidden=h), mesh=mesh)
    print(f"{r} x {devices[0].platform}; buffer {buf}, {buf.size_hint()} bytes per rank")

    key = jax.random.key(int.from_bytes(os.urandom(4), "little"))
    kx, kp = jax.random.split(key)
    x = jax.random.normal(kx, (r * t, h), jnp.float32).astype(jnp.bfloat16)
    params = moe.init_params(kp, h, 128, e)

    # 2. Per rank, inside shard_map: route, dispatch, run the local experts, combine.
    def layer(p, xs):
        idx, w = moe.route(p["router"], xs, k)
        res = ep.dispatch(xs, idx, buf)                   # recv_x: [LE, R*M, H], packed rows
        y = moe.expert_ffn(res.recv_x, p["w_in"], p["w_out"], res.recv_count)
        return ep.combine(y, idx, w, res.handle, buf)     # [T, H]

    f = jax.jit(jax.shard_map(layer, mesh=mesh, in_specs=(moe.param_specs(), P("ep")),
                              out_specs=P("ep")))
    out = f(params, x)
    want = moe.moe_dense(params, x, top_k=k)
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - want.astype(jnp.float32))))
    print(f"out {out.shape} {out.dtype}; max |EP - dense| = {err:.3e}")

    # 3. Gradients flow through dispatch and combine (their backward passes are exchanges too).
    loss = lambda p, xs: jnp.mean(jnp.square(f(p, xs).astype(jnp.float32)))
    val, grads = jax.jit(jax.value_and_grad(loss))(params, x)
    gnorm = float(jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))))
    print(f"loss {float(val):.4f}, |grad| {gnorm:.4f}")
    buf.close()
    scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
    if not (err <= 2e-2 * scale and np.isfinite(gnorm) and gnorm > 0):
        print("FAILED")
        return 1
    print("OK: quickstart")
    return 0


if __name__ == "__main__":
    sys.exit(main())
