"""The exchange primitives, each declared once (see ``declare.py``).

    dispatch_p        tokens -> rows of the experts' ranks (the LL dispatch)
    combine_p         expert rows -> weighted sum per token (the LL combine)
    dispatch_send_p   dispatch's send half: returns the order token only
    dispatch_recv_p   dispatch's receive half: the whole call's operands and results
    combine_send_p    combine's send half
    combine_recv_p    combine's receive half
    scatter_to_rows_p combine's gradient w.r.t. y: weighted rows back to the handle's rows
    gather_rows_p     combine without the reduction: the row of each (token, slot)

The receive halves take the whole call's operands (the reference needs them; the
kernels ignore what the send half already sent). On CPU a send half only passes the
order token on and its receive half runs the whole reference exchange.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import config as cfg
from . import lowering, reference, reference_bwd
from .declare import Exchange, declare

DISPATCH_TARGET = "jmep_ll_dispatch"
COMBINE_TARGET = "jmep_ll_combine"


# ---------------------------------------------------------------- abstract evals

def dispatch_out_avals(h, *, num_experts, max_tokens, num_ranks, use_fp8,
                       sa=jax.core.ShapedArray):
    """recv_x, recv_scales, recv_count, src_info, layout_range, stats, order."""
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


def _dispatch_abstract(x, topk_idx, stats, order, *, sa, num_experts, max_tokens, num_ranks,
                       use_fp8, **_):
    return dispatch_out_avals(x.shape[1], num_experts=num_experts, max_tokens=max_tokens,
                              num_ranks=num_ranks, use_fp8=use_fp8, sa=sa)


def _combine_abstract(y, topk_idx, topk_weights, src_info, layout_range, order, *, sa, **_):
    return sa((topk_idx.shape[0], y.shape[2]), jnp.bfloat16), sa((), jnp.int32)


def _order_only_abstract(*avals, sa, **_):
    return (sa((), jnp.int32),)


def _scatter_abstract(g, topk_idx, topk_weights, src_info, layout_range, order, *, sa, **_):
    le, rows = src_info.shape
    return sa((le, rows, g.shape[1]), jnp.bfloat16), sa((), jnp.int32)


def _gather_abstract(y, topk_idx, src_info, layout_range, order, *, sa, **_):
    t, k = topk_idx.shape
    return sa((t, k, y.shape[2]), jnp.bfloat16), sa((), jnp.int32)


# ---------------------------------------------------------------- references

def _dispatch_reference(x, topk_idx, stats, order, *, num_experts, max_tokens, axis_name,
                        use_fp8, round_scale, masked=(), **_):
    out = reference.dispatch_shard(x, topk_idx, num_experts=num_experts, max_tokens=max_tokens,
                                   axis_name=axis_name, use_fp8=use_fp8, round_scale=round_scale,
                                   masked=masked)
    return (*out, stats + out.recv_count, order)


def _combine_reference(y, topk_idx, topk_weights, src_info, layout_range, order, *, num_experts,
                       max_tokens, axis_name, masked=(), **_):
    out = reference.combine_shard(y, topk_idx, topk_weights, src_info, layout_range,
                                  num_experts=num_experts, max_tokens=max_tokens,
                                  axis_name=axis_name, masked=masked)
    return out, order


def _pass_order(*args, **_):
    return (args[-1],)


def _scatter_reference(g, topk_idx, topk_weights, src_info, layout_range, order, *, num_experts,
                       max_tokens, axis_name, masked=(), **_):
    out = reference_bwd.scatter_to_rows(g, topk_idx, topk_weights, src_info, layout_range,
                                        num_experts=num_experts, max_tokens=max_tokens,
                                        axis_name=axis_name, masked=masked)
    return out, order


def _gather_reference(y, topk_idx, src_info, layout_range, order, *, num_experts, max_tokens,
                      axis_name, masked=(), **_):
    out = reference_bwd.gather_rows(y, topk_idx, src_info, layout_range, num_experts=num_experts,
                                    max_tokens=max_tokens, axis_name=axis_name, masked=masked)
    return out, order


# ---------------------------------------------------------------- custom-call operands

def row_map(src_info, layout_range, max_tokens: int):
    """[LE, R*M] int32: at [j, r*M + t] the handle's row of (source rank r, token t), else -1.
    The weighted dispatch kernel stores each message at this row."""
    le, rows = src_info.shape
    offset, count = reference.unpack_layout(layout_range)
    src_rank, row_ok = reference.row_owner(offset, count, rows)
    ok = row_ok & (src_info >= 0) & (src_info < max_tokens)
    key = jnp.where(ok, src_rank * max_tokens + src_info, rows)  # rows: out of range, dropped
    j = jnp.broadcast_to(jnp.arange(le, dtype=jnp.int32)[:, None], (le, rows))
    mine = jnp.broadcast_to(jnp.arange(rows, dtype=jnp.int32)[None, :], (le, rows))
    return jnp.full((le, rows), -1, jnp.int32).at[j, key].set(mine, mode="drop")


def _scatter_operands(g, topk_idx, topk_weights, src_info, layout_range, order, *, max_tokens,
                      **_):
    return (g.astype(jnp.bfloat16), topk_idx, topk_weights.astype(jnp.float32),
            row_map(src_info, layout_range, max_tokens), order)


def _gather_operands(y, topk_idx, src_info, layout_range, order, **_):
    return y.astype(jnp.bfloat16), topk_idx, src_info, layout_range, order


def _hidden_of_tokens(avals):
    return avals[0].shape[1]   # x [T, H] / g [T, H]


def _hidden_of_rows(avals):
    return avals[0].shape[2]   # y [LE, R*M, H]


# ---------------------------------------------------------------- the declarations

dispatch_p = declare(Exchange(
    "dispatch", _dispatch_abstract, _dispatch_reference, DISPATCH_TARGET, {2: 5, 3: 6},
    _hidden_of_tokens))
combine_p = declare(Exchange(
    "combine", _combine_abstract, _combine_reference, COMBINE_TARGET, {5: 1}, _hidden_of_rows))
dispatch_send_p = declare(Exchange(
    "dispatch_send", _order_only_abstract, _pass_order, "jmep_ll_dispatch_send", {2: 0},
    _hidden_of_tokens))
dispatch_recv_p = declare(Exchange(
    "dispatch_recv", _dispatch_abstract, _dispatch_reference, DISPATCH_TARGET, {2: 5, 3: 6},
    _hidden_of_tokens, phases=lowering.PHASES_RECV))
combine_send_p = declare(Exchange(
    "combine_send", _order_only_abstract, _pass_order, "jmep_ll_combine_send", {3: 0},
    _hidden_of_rows))
combine_recv_p = declare(Exchange(
    "combine_recv", _combine_abstract, _combine_reference, COMBINE_TARGET, {5: 1},
    _hidden_of_rows, phases=lowering.PHASES_RECV))
scatter_to_rows_p = declare(Exchange(
    "scatter_to_rows", _scatter_abstract, _scatter_reference, "jmep_ll_scatter_rows", {4: 1},
    _hidden_of_tokens, operands=_scatter_operands))
gather_rows_p = declare(Exchange(
    "gather_rows", _gather_abstract, _gather_reference, "jmep_ll_gather_rows", {4: 1},
    _hidden_of_rows, operands=_gather_operands))
