"""The dispatch and combine primitives: abstract eval, batching, CPU lowering.

The CUDA lowering (to the XLA FFI handlers) is registered by ``gpu.py``
when the native module was built with CUDA. Both primitives carry an
``order`` operand, an int32 scalar that each call passes through: threading it
from one call to the next gives XLA a data dependency, so calls on one buffer
run in the same order on every rank.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from . import config as cfg
from . import reference

try:  # jax >= 0.4.3x keeps apply_primitive here; it is what eager binds use
    from jax._src.dispatch import apply_primitive as _apply_primitive
except ImportError:  # pragma: no cover
    _apply_primitive = None

dispatch_p = Primitive("jax_mscclpp_ep_dispatch")
dispatch_p.multiple_results = True
combine_p = Primitive("jax_mscclpp_ep_combine")
combine_p.multiple_results = True

for _p in (dispatch_p, combine_p):
    _p.def_impl(functools.partial(_apply_primitive, _p))


# ---------------------------------------------------------------- abstract eval

def _aval_maker(axis_name, *inputs):
    """ShapedArray constructor whose outputs vary over the EP axis inside shard_map.

    The outputs differ per rank, so with check_vma they must be typed as
    varying over the axis (plus whatever the inputs vary over). jax 0.10 keeps
    this in ``manual_axis_type.varying``; older releases in ``vma``.
    """
    sa = jax.core.ShapedArray
    extra = {axis_name} if axis_name is not None else set()
    if inputs and hasattr(inputs[0], "manual_axis_type"):
        mats = [a.manual_axis_type for a in inputs]
        varying = frozenset().union(*(m.varying for m in mats)) | extra
        mat = type(mats[0])(varying=varying, unreduced=frozenset(), reduced=frozenset())
        sharding = inputs[0].sharding
        return lambda shape, dtype: sa(
            shape, dtype, sharding=sharding.update(spec=jax.sharding.PartitionSpec()),
            manual_axis_type=mat)
    if inputs and hasattr(inputs[0], "vma"):
        vma = frozenset().union(*(a.vma for a in inputs)) | extra
        return lambda shape, dtype: sa(shape, dtype, vma=vma)
    return sa


def dispatch_out_avals(t, h, *, num_experts, max_tokens, num_ranks, use_fp8,
                       sa=jax.core.ShapedArray):
    le, rows = num_experts // num_ranks, num_ranks * max_tokens
    lr = cfg.layout_range_aval(le, num_ranks)
    return (
        sa((le, rows, h), jnp.float8_e4m3fn if use_fp8 else jnp.bfloat16),
        sa((le, rows, h // cfg.FP8_BLOCK if use_fp8 else 0), jnp.float32),
        sa((le,), jnp.int32),
        sa((le, rows), jnp.int32),
        sa(lr.shape, lr.dtype),
        sa((le,), jnp.int32),
        sa((), jnp.int32),
    )


@dispatch_p.def_abstract_eval
def _dispatch_abstract(x, topk_idx, stats, order, *, num_experts, max_tokens, num_ranks,
                       axis_name, use_fp8, round_scale, buffer_id):
    del round_scale, buffer_id
    t, h = x.shape
    return dispatch_out_avals(t, h, num_experts=num_experts, max_tokens=max_tokens,
                              num_ranks=num_ranks, use_fp8=use_fp8,
                              sa=_aval_maker(axis_name, x, topk_idx, stats, order))


@combine_p.def_abstract_eval
def _combine_abstract(y, topk_idx, topk_weights, src_info, layout_range, order, *, num_experts,
                      max_tokens, num_ranks, axis_name, buffer_id):
    del num_experts, max_tokens, num_ranks, buffer_id
    sa = _aval_maker(axis_name, y, topk_idx, topk_weights, src_info, layout_range, order)
    return sa((topk_idx.shape[0], y.shape[2]), jnp.bfloat16), sa((), jnp.int32)


# ---------------------------------------------------------------- CPU lowering

def _dispatch_reference(x, topk_idx, stats, order, *, num_experts, max_tokens, num_ranks,
                        axis_name, use_fp8, round_scale, buffer_id):
    del num_ranks, buffer_id
    out = reference.dispatch_shard(x, topk_idx, num_experts=num_experts, max_tokens=max_tokens,
                                   axis_name=axis_name, use_fp8=use_fp8, round_scale=round_scale)
    return (*out, stats + out.recv_count, order)


def _combine_reference(y, topk_idx, topk_weights, src_info, layout_range, order, *, num_experts,
                       max_tokens, num_ranks, axis_name, buffer_id):
    del num_ranks, buffer_id
    out = reference.combine_shard(y, topk_idx, topk_weights, src_info, layout_range,
                                  num_experts=num_experts, max_tokens=max_tokens,
                                  axis_name=axis_name)
    return out, order


mlir.register_lowering(dispatch_p, mlir.lower_fun(_dispatch_reference, multiple_results=True),
                       platform="cpu")
mlir.register_lowering(combine_p, mlir.lower_fun(_combine_reference, multiple_results=True),
                       platform="cpu")


# ---------------------------------------------------------------- batching

def _batched_loop(prim, args, dims, **params):
    """vmap = independent exchanges, one per batch element, run in sequence.

    Each element is a full collective call; the order token is chained from
    one element to the next so every rank runs them in the same order.
    Returns outputs stacked on axis 0 (the order token too).
    """
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    moved = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims)]
    order_pos = len(args) - 1
    results, order = [], None
    for b in range(size):
        elem = [a if d is None else a[b] for a, d in zip(moved, dims)]
        if order is not None:
            elem[order_pos] = order
        outs = prim.bind(*elem, **params)
        order = outs[-1]
        results.append(outs)
    stacked = [jnp.stack(col) for col in zip(*results)]
    return stacked, [0] * len(stacked)


batching.primitive_batchers[dispatch_p] = functools.partial(_batched_loop, dispatch_p)
batching.primitive_batchers[combine_p] = functools.partial(_batched_loop, combine_p)
