"""Primitives of combine's backward pass: abstract eval, batching, CPU lowering.

``scatter_to_rows_p`` (gradient w.r.t. the expert outputs) and
``gather_rows_p`` (rows for the gradient w.r.t. topk_weights) are exchanges
over the EP group like dispatch/combine, so they are primitives with the same
params (buffer_id, axis_name, num_experts, max_tokens, num_ranks) and the same
int32 ``order`` operand passed through as the last output. On CPU they lower
to ``reference_bwd``; on GPUs ``gpu_bwd.py`` lowers them to the LL kernels.

The backward of dispatch needs no new primitive: it is ``combine_p`` with
weight 1 on the slots that sent a message (see ``api.py``).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from . import reference_bwd
from .primitives import _apply_primitive, _aval_maker, _batched_loop

scatter_to_rows_p = Primitive("jax_mscclpp_ep_scatter_to_rows")
scatter_to_rows_p.multiple_results = True
gather_rows_p = Primitive("jax_mscclpp_ep_gather_rows")
gather_rows_p.multiple_results = True

for _p in (scatter_to_rows_p, gather_rows_p):
    _p.def_impl(functools.partial(_apply_primitive, _p))


@scatter_to_rows_p.def_abstract_eval
def _scatter_abstract(g, topk_idx, topk_weights, src_info, layout_range, order, *, num_experts,
                      max_tokens, num_ranks, axis_name, buffer_id):
    del num_experts, max_tokens, num_ranks, buffer_id
    sa = _aval_maker(axis_name, g, topk_idx, topk_weights, src_info, layout_range, order)
    le, rows = src_info.shape
    return sa((le, rows, g.shape[1]), jnp.bfloat16), sa((), jnp.int32)


@gather_rows_p.def_abstract_eval
def _gather_abstract(y, topk_idx, src_info, layout_range, order, *, num_experts, max_tokens,
                     num_ranks, axis_name, buffer_id):
    del num_experts, max_tokens, num_ranks, buffer_id
    sa = _aval_maker(axis_name, y, topk_idx, src_info, layout_range, order)
    t, k = topk_idx.shape
    return sa((t, k, y.shape[2]), jnp.bfloat16), sa((), jnp.int32)


def _scatter_reference(g, topk_idx, topk_weights, src_info, layout_range, order, *, num_experts,
                       max_tokens, num_ranks, axis_name, buffer_id):
    del num_ranks, buffer_id
    out = reference_bwd.scatter_to_rows(g, topk_idx, topk_weights, src_info, layout_range,
                                        num_experts=num_experts, max_tokens=max_tokens,
                                        axis_name=axis_name)
    return out, order


def _gather_reference(y, topk_idx, src_info, layout_range, order, *, num_experts, max_tokens,
                      num_ranks, axis_name, buffer_id):
    del num_ranks, buffer_id
    out = reference_bwd.gather_rows(y, topk_idx, src_info, layout_range, num_experts=num_experts,
                                    max_tokens=max_tokens, axis_name=axis_name)
    return out, order


# The reference on GPUs too (its all_to_all is an XLA collective over the same
# shard_map axis) until gpu_bwd.py replaces it with the kernels' lowering.
for _platform in ("cpu", "cuda"):
    mlir.register_lowering(scatter_to_rows_p,
                           mlir.lower_fun(_scatter_reference, multiple_results=True),
                           platform=_platform)
    mlir.register_lowering(gather_rows_p,
                           mlir.lower_fun(_gather_reference, multiple_results=True),
                           platform=_platform)

batching.primitive_batchers[scatter_to_rows_p] = functools.partial(_batched_loop,
                                                                   scatter_to_rows_p)
batching.primitive_batchers[gather_rows_p] = functools.partial(_batched_loop, gather_rows_p)
