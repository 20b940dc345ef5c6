"""CUDA lowerings of combine's backward exchanges (``primitives_bwd``).

- ``scatter_to_rows_p`` (gradient w.r.t. the expert outputs) runs the dispatch
  kernel in its weighted mode: each (token, expert) message carries the sum
  of that expert's slot weights, the receiver scales the bf16 row by it in
  f32 (one rounding, as the reference does) and stores it at the row the
  forward handle gave (source rank, token). ``row_map`` is that inverse of
  the handle, built here from ``src_info``/``layout_range`` (a small int32
  scatter); rows outside the handle come back as zeros.
- ``gather_rows_p`` (rows for the gradient w.r.t. topk_weights) runs the
  combine kernel in its per-slot mode: ``out[t, k]`` is the row of
  (t, topk_idx[t, k]), unreduced.

Both use the Buffer's state like any dispatch/combine, in the same order on
every rank (the order token). Builds without these targets keep the
reference lowering (an XLA all_to_all).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.interpreters import mlir

from . import reference
from .gpu import _PHASES_BOTH, _TARGETS, _check_hidden, _check_target, isolated_call, ll_attrs
from .primitives_bwd import gather_rows_p, scatter_to_rows_p

SCATTER_ROWS_TARGET = "jmep_ll_scatter_rows"
GATHER_ROWS_TARGET = "jmep_ll_gather_rows"


def row_map(src_info, layout_range, max_tokens: int):
    """[LE, R*M] int32: at [j, r*M + t] the handle's row of (source rank r, token t), else -1."""
    le, rows = src_info.shape
    offset, count = reference.unpack_layout(layout_range)
    src_rank, row_ok = reference._row_owner(offset, count, rows)
    ok = row_ok & (src_info >= 0) & (src_info < max_tokens)
    key = jnp.where(ok, src_rank * max_tokens + src_info, rows)  # rows: out of range, dropped
    j = jnp.broadcast_to(jnp.arange(le, dtype=jnp.int32)[:, None], (le, rows))
    mine = jnp.broadcast_to(jnp.arange(rows, dtype=jnp.int32)[None, :], (le, rows))
    return jnp.full((le, rows), -1, jnp.int32).at[j, key].set(mine, mode="drop")


def _call(target, out_shape, order, *args, buffer_id, num_experts, max_tokens):
    """One custom call: bf16 out_shape and the order token (aliased to the last operand)."""
    avals = (jax.ShapeDtypeStruct(out_shape, jnp.bfloat16),
             jax.ShapeDtypeStruct(order.shape, order.dtype))
    return isolated_call(target, avals, (*args, order), {len(args): 1},
                         **ll_attrs(buffer_id=buffer_id, num_experts=num_experts,
                                    max_tokens=max_tokens, use_fp8=False, round_scale=False,
                                    phases=_PHASES_BOTH))


def _scatter_kernel(g, topk_idx, topk_weights, src_info, layout_range, order, *, num_experts,
                    max_tokens, num_ranks, axis_name, buffer_id):
    del num_ranks, axis_name
    le, rows = src_info.shape
    return _call(SCATTER_ROWS_TARGET, (le, rows, g.shape[1]), order, g.astype(jnp.bfloat16),
                 topk_idx, topk_weights.astype(jnp.float32),
                 row_map(src_info, layout_range, max_tokens),
                 buffer_id=buffer_id, num_experts=num_experts, max_tokens=max_tokens)


def _gather_kernel(y, topk_idx, src_info, layout_range, order, *, num_experts, max_tokens,
                   num_ranks, axis_name, buffer_id):
    del num_ranks, axis_name
    return _call(GATHER_ROWS_TARGET, topk_idx.shape + (y.shape[2],), order, y.astype(jnp.bfloat16),
                 topk_idx, src_info, layout_range,
                 buffer_id=buffer_id, num_experts=num_experts, max_tokens=max_tokens)


def _lowering(kernel, target, hidden_of):
    lowered = mlir.lower_fun(kernel, multiple_results=True)

    def rule(ctx, *args, **params):
        _check_target(target, params["buffer_id"])
        _check_hidden(hidden_of(ctx.avals_in))
        return lowered(ctx, *args, **params)
    return rule


if SCATTER_ROWS_TARGET in _TARGETS and GATHER_ROWS_TARGET in _TARGETS:
    mlir.register_lowering(
        scatter_to_rows_p,
        _lowering(_scatter_kernel, SCATTER_ROWS_TARGET, lambda avals: avals[0].shape[1]),
        platform="cuda")
    mlir.register_lowering(
        gather_rows_p,
        _lowering(_gather_kernel, GATHER_ROWS_TARGET, lambda avals: avals[0].shape[2]),
        platform="cuda")
