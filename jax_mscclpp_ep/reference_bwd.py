"""The exchanges of combine's backward pass in pure JAX (CPU path, oracle).

Both run per rank inside ``shard_map`` and use the forward dispatch's handle
(``src_info``, ``layout_range``) to find the row that held each
(source rank, token, expert), so they work with any valid handle, the
kernels' row order included:

- ``scatter_to_rows``: the gradient of combine w.r.t. its expert outputs y.
  Token t of the source rank sends, for each expert e it named,
  ``sum_{k: idx[t,k] = e} w[t,k] * g[t]`` (f32, one bf16 rounding) to the row
  of (t, e); rows outside the handle get zeros. A dispatch whose payload is
  weighted per (token, expert) and whose destination rows are fixed.
- ``gather_rows``: combine's exchange without the reduction: for each slot
  (t, k) the row of (t, idx[t,k]) as bf16, zeros for masked slots; the
  gradient w.r.t. topk_weights is <g[t], row(t, k)> computed from it.

Masked ranks (``masked``) as in the forward exchanges: slots whose expert's owner is
masked, and every slot of a masked rank, carry nothing.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from .reference import (axis_size, combine_slots, rank_index, row_owner, unmasked_slots,
                        unpack_layout)


def _row_tokens(src_info, layout_range, rows, max_tokens):
    """(source rank [LE, rows], token [LE, rows]; M where the row is not in the handle)."""
    offset, count = unpack_layout(layout_range)
    src_rank, row_ok = row_owner(offset, count, rows)
    ok = row_ok & (src_info >= 0) & (src_info < max_tokens)
    return src_rank, jnp.where(ok, src_info, max_tokens), ok


def scatter_to_rows(g, topk_idx, topk_weights, src_info, layout_range, *, num_experts: int,
                    max_tokens: int, axis_name, masked: tuple = ()):
    """grad_y [LE, R*M, H] bf16 from g [T, H] (see the module docstring)."""
    num_ranks = axis_size(axis_name)
    e, m = num_experts, max_tokens
    le, rows = src_info.shape
    t, h = g.shape
    ok = combine_slots(topk_idx, e) & unmasked_slots(topk_idx, e, num_ranks, masked,
                                                     rank_index(axis_name))
    e_idx = jnp.where(ok, topk_idx.astype(jnp.int32), 0)
    w = jnp.where(ok, topk_weights, 0.0).astype(jnp.float32)
    # Per (expert, token) weight: duplicate slots of one expert add up.
    onehot = (e_idx[:, :, None] == jnp.arange(e)[None, None, :]) & ok[:, :, None]   # [T, K, E]
    w_te = jnp.sum(jnp.where(onehot, w[:, :, None], 0.0), axis=1)                   # [T, E]
    vals = (w_te.T[:, :, None] * g.astype(jnp.float32)[None]).astype(jnp.bfloat16)  # [E, T, H]
    send = jnp.zeros((e, m, h), jnp.bfloat16).at[:, :t].set(vals)                    # [E, M, H]
    send = send.reshape(num_ranks, le, m, h)                   # [R(dst), LE, M, H]
    if axis_name is not None and num_ranks > 1:
        send = lax.all_to_all(send, axis_name, 0, 0, tiled=True)   # [R(src), LE, M, H]
    src_rank, tok, row_ok = _row_tokens(src_info, layout_range, rows, m)
    j = jnp.broadcast_to(jnp.arange(le)[:, None], (le, rows))
    got = send[src_rank, j, jnp.minimum(tok, m - 1)]            # [LE, rows, H]
    return jnp.where(row_ok[:, :, None], got, jnp.zeros((), jnp.bfloat16))


def gather_rows(y, topk_idx, src_info, layout_range, *, num_experts: int, max_tokens: int,
                axis_name, masked: tuple = ()):
    """[T, K, H] bf16: the row that held (t, topk_idx[t,k]); zeros for masked slots."""
    num_ranks = axis_size(axis_name)
    le, rows, h = y.shape
    e, m = num_experts, max_tokens
    t = topk_idx.shape[0]
    src_rank, tok, _ = _row_tokens(src_info, layout_range, rows, m)
    j = jnp.broadcast_to(jnp.arange(le)[:, None], (le, rows))
    back = jnp.zeros((num_ranks, le, m, h), y.dtype).at[src_rank, j, tok].set(y, mode="drop")
    if axis_name is not None and num_ranks > 1:
        back = lax.all_to_all(back, axis_name, 0, 0, tiled=True)   # [R(owner), LE, M, H]
    table = back.reshape(e, m, h)
    ok = combine_slots(topk_idx, e) & unmasked_slots(topk_idx, e, num_ranks, masked,
                                                     rank_index(axis_name))
    e_idx = jnp.where(ok, topk_idx.astype(jnp.int32), 0)
    got = table[e_idx, jnp.arange(t)[:, None]]                  # [T, K, H]
    return jnp.where(ok[:, :, None], got, jnp.zeros((), y.dtype)).astype(jnp.bfloat16)
