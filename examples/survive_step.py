"""The decode step of the examples that keep serving after a rank is lost, and its dense twin.

The router reads which experts are alive (ep.alive_experts inside the EP step, an explicit
mask in the dense one), so no token goes to a lost rank's experts and the top-k weights
renormalise over the live ones. No import-time setup: callers choose their devices.
"""

import jax
import jax.numpy as jnp

import jax_mscclpp_ep as ep
from jax_mscclpp_ep import moe


def rmsnorm(x):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)


def route(router, xb, alive, k):
    """top-k of the softmax over live experts only: (idx [N, K], weights [N, K] summing to 1)."""
    logits = jnp.dot(xb.astype(jnp.float32), router, precision=jax.lax.Precision.HIGHEST)
    w, idx = jax.lax.top_k(jax.nn.softmax(jnp.where(alive, logits, -jnp.inf)), k)
    return idx.astype(jnp.int32), w / jnp.sum(w, -1, keepdims=True)


def ep_step_fn(buf, k):
    """(params, hs, order) -> (hs + MoE(hs), order [1]) on one rank, inside shard_map."""
    def ep_step(p, hs, order):
        xb = rmsnorm(hs).astype(jnp.bfloat16)
        idx, w = route(p["router"], xb, ep.alive_experts(buf, after=order), k)
        res = ep.dispatch(xb, idx, buf, after=order)
        y = moe.expert_ffn(res.recv_x, p["w_in"], p["w_out"], res.recv_count)
        out, order = ep.combine(y, idx, w, res.handle, buf, return_order=True)
        return hs + out.astype(jnp.float32), order[None]
    return ep_step


def dense_step_fn(num_experts, k):
    """(params, hs, alive[, answered]) -> hs + MoE(hs), every expert computed densely (the oracle).

    Routing is over ``alive`` (bool[E]); ``answered`` (bool[E], default: all) says whose
    outputs come back. The step during which a rank is lost routes to it but gets nothing
    back from its experts: routed over all, answered by the live ones.
    """
    @jax.jit
    def dense_step(p, hs, alive, answered=None):
        xb = rmsnorm(hs).astype(jnp.bfloat16)
        idx, w = route(p["router"], xb, alive, k)
        every = moe.expert_ffn(jnp.broadcast_to(xb[None], (num_experts,) + xb.shape),
                               p["w_in"], p["w_out"])
        if answered is not None:
            every = jnp.where(answered[:, None, None], every, 0)
        rows = every[idx, jnp.arange(xb.shape[0])[:, None]].astype(jnp.float32)   # [N, K, H]
        return hs + jnp.sum(rows * w[..., None], axis=1).astype(jnp.bfloat16).astype(jnp.float32)
    return dense_step
