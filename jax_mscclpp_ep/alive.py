"""Which experts / ranks are still served: what a router reads to avoid masked ranks.

    logits = jnp.where(ep.alive_experts(buf), logits, -jnp.inf)

On GPUs ``alive_experts`` is one custom call ("jmep_ll_alive") that reads this device's
mask when the step runs: no host work per call, so it replays inside CUDA graphs and
sees a rank the kernels masked in an earlier call without retracing. On CPU it is a
constant from the Buffer's host mask (changing the mask clears JAX's caches, so the
next call retraces). Inside shard_map over the EP axis each rank reads its own
device's mask; outside shard_map the value is that of the device the call runs on
(the ranks agree once the mask has travelled with their signals).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.dispatch import apply_primitive
from jax.extend.core import Primitive
from jax.interpreters import mlir

from . import api, lowering, mask
from .declare import aval_maker

ALIVE_TARGET = "jmep_ll_alive"

alive_p = Primitive("jax_mscclpp_ep_alive")
alive_p.multiple_results = True
alive_p.def_impl(functools.partial(apply_primitive, alive_p))


def _abstract(order, *, num_experts, axis_name, **_):
    sa = aval_maker(axis_name, order)
    return sa((num_experts,), jnp.int32), sa((), jnp.int32)


def _reference(order, *, num_experts, num_ranks, masked, **_):
    table = np.asarray(mask.alive_table(num_experts, num_ranks, masked), np.int32)
    return jnp.asarray(table), order


def _cuda_rule(ctx, order, **params):
    lowering.check_target(ALIVE_TARGET, params["buffer_id"])
    attrs = lowering.attributes(params, lowering.PHASES_BOTH)

    def call(o):
        return lowering.isolated_call(ALIVE_TARGET, ctx.avals_out, [o], {0: 1}, attrs)
    return mlir.lower_fun(call, multiple_results=True)(ctx, order)


alive_p.def_abstract_eval(_abstract)
mlir.register_lowering(alive_p, mlir.lower_fun(_reference, multiple_results=True), platform="cpu")
mlir.register_lowering(alive_p, _cuda_rule, platform="cuda")


def alive_params(buffer, axis_name) -> dict:
    """The params of alive_p; outside shard_map (axis not bound) the Buffer's rank count."""
    config, axis_name, buffer_id, masked = api.resolve(buffer, axis_name)
    try:
        num_ranks = api.axis_ranks(axis_name)
        api.check_mesh(buffer, num_ranks)
    except NameError:
        axis_name, num_ranks = None, getattr(buffer, "num_ranks", 1)
    return dict(num_experts=config.num_experts, max_tokens=config.max_tokens_per_rank,
                num_ranks=num_ranks, axis_name=axis_name, buffer_id=int(buffer_id),
                masked=tuple(masked))


def alive_experts(buffer, *, axis_name=api.BUFFER_AXIS, after=None, return_order: bool = False):
    """bool[E]: True where expert e's owner rank e // (E / R) is not masked (see the module
    docstring). after: a handle/result/order token this read must follow (e.g. the step's
    dispatch, to see a rank it masked); return_order also gives the token it passes on."""
    alive, order = alive_p.bind(api.order_from(after), **alive_params(buffer, axis_name))
    alive = alive.astype(bool)
    return (alive, order) if return_order else alive


def alive_ranks(buffer, *, axis_name=api.BUFFER_AXIS, after=None) -> jax.Array:
    """bool[R]: True where the rank is not masked."""
    alive = alive_experts(buffer, axis_name=axis_name, after=after)
    params = alive_params(buffer, axis_name)
    return jnp.any(alive.reshape(params["num_ranks"], -1), axis=1)
