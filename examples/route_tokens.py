"""Route random tokens through dispatch -> a toy expert FFN -> combine, and check.

Runs under jax.shard_map over an "ep" mesh axis: on the GPUs when there are
several, otherwise on 8 virtual CPU devices (the pure-JAX reference path).
The result is checked against the same MoE computed densely, without expert
parallelism:  out[t] = sum_k w[t,k] * FFN_{idx[t,k]}(x[t]).

    python examples/route_tokens.py [--tokens 64] [--hidden 256] [--experts 32] [--topk 4] [--fp8]
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64, help="tokens per rank (T = M)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=128)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--fp8", action="store_true", help="fp8 dispatch")
    ap.add_argument("--gpu", action="store_true", help="use the GPUs (default: 8 CPU devices)")
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args()

    devices = jax.devices()
    r = len(devices)
    mesh = Mesh(np.array(devices), ("ep",))
    t, h, f, e, k = a.tokens, a.hidden, a.ffn, a.experts, a.topk
    le = e // r
    seed = a.seed if a.seed is not None else int.from_bytes(os.urandom(4), "little")
    rng = np.random.default_rng(seed)
    print(f"{r} x {devices[0].platform} devices; T=M={t} H={h} E={e} K={k} fp8={a.fp8} seed={seed}")

    x = jnp.asarray(rng.standard_normal((r * t, h)), jnp.bfloat16)
    logits = rng.standard_normal((r * t, e))
    idx = np.argsort(-logits, axis=1)[:, :k].astype(np.int32)
    w = np.take_along_axis(np.exp(logits), idx, 1)
    w = (w / w.sum(1, keepdims=True)).astype(np.float32)
    w1 = jnp.asarray(rng.standard_normal((e, h, f)) / np.sqrt(h), jnp.bfloat16)
    w2 = jnp.asarray(rng.standard_normal((e, f, h)) / np.sqrt(f), jnp.bfloat16)

    buf = ep.Buffer(ep.EPConfig(num_experts=e, max_tokens_per_rank=t, hidden=h), mesh=mesh)

    def ffn(xs, w1s, w2s):  # [LE, rows, H] through each local expert
        hid = jax.nn.relu(jnp.einsum("erh,ehf->erf", xs, w1s, preferred_element_type=jnp.float32))
        return jnp.einsum("erf,efh->erh", hid.astype(jnp.bfloat16), w2s,
                          preferred_element_type=jnp.float32).astype(jnp.bfloat16)

    def moe(xs, ids, ws, w1s, w2s):
        res = ep.dispatch(xs, ids, buf, use_fp8=a.fp8)
        y = res.recv_x
        if a.fp8:
            y = ep.dequantize(res.recv_x, res.recv_scales).astype(jnp.bfloat16)
        return ep.combine(ffn(y, w1s, w2s), ids, ws, res.handle, buf)

    step = jax.jit(jax.shard_map(moe, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
    out = np.asarray(step(x, jnp.asarray(idx), jnp.asarray(w), w1, w2)).astype(np.float32)

    # Dense reference: every token through its k experts, no exchange.
    xq = x
    if a.fp8:
        q, s = ep.fp8_cast(x)
        xq = ep.dequantize(q, s).astype(jnp.bfloat16)
    per_slot = ffn(jnp.broadcast_to(xq[None], (e, r * t, h)), w1, w2)   # [E, N, H]
    want = np.einsum("nk,nkh->nh", w, np.asarray(per_slot.astype(jnp.float32))[idx, np.arange(r * t)[:, None]])
    err = np.abs(out - want).max() / np.abs(want).max()
    counts = np.bincount(idx.ravel() // le, minlength=r)
    print(f"tokens per destination rank: {counts.tolist()}")
    print(f"max |out - dense| / max |dense| = {err:.2e}")
    buf.close()
    if not err < 2e-2:
        print("FAILED: expert-parallel result differs from the dense MoE")
        return 1
    print("OK: expert-parallel MoE output matches the dense computation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
