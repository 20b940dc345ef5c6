"""A stack of MoE layers sharing one Buffer (the README's default), for the CPU and GPU
tests: h <- h + moe(params_l, h) for each layer, as a Python loop or a lax.scan over
stacked params, with the order token threaded from layer to layer."""

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jax_mscclpp_ep import moe


def init_layers(key, n_layers, hidden, ffn, experts, scale=1.0):
    return [moe.init_params(k, hidden, ffn, experts, scale=scale)
            for k in jax.random.split(key, n_layers)]


def stack(layers):
    """[{name: array}] per layer -> {name: array with a leading layer axis}."""
    return jax.tree.map(lambda *a: jnp.stack(a), *layers)


def ep_model(mesh, buf, *, top_k, scan, **kw):
    """f(layers, x [N, H]) -> [N, H] bf16 with every layer's exchange on ``buf``.
    scan=True takes ``stack(layers)`` and runs the layers as one lax.scan."""
    specs = moe.param_specs()
    mesh_axis = buf.axis_name

    def body(layers, x):
        def layer(carry, p):
            h, order = carry
            out, order = moe.moe_layer(p, h, buf, top_k=top_k, after=order, return_order=True, **kw)
            return (h + out, order), None

        # The order token crosses the scan as a carry: start it varying over the EP axis
        # like the tokens that combine returns.
        carry = (x, lax.pcast(jnp.zeros((), jnp.int32), (mesh_axis,), to="varying"))
        if scan:
            (h, _), _ = lax.scan(layer, carry, layers)
            return h
        for p in layers:
            carry, _ = layer(carry, p)
        return carry[0]

    pspec = {k: P(None, *s) for k, s in specs.items()} if scan else None
    return lambda layers, x: jax.shard_map(
        body, mesh=mesh, out_specs=P("ep"),
        in_specs=(pspec if scan else [specs] * len(layers), P("ep")))(layers, x)


def dense_model(layers, x, *, top_k, **kw):
    h = x
    for p in layers:
        h = h + moe.moe_dense(p, h, top_k=top_k, **kw)
    return h
