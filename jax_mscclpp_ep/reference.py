"""The LL contract in pure JAX: the CPU path and the oracle for the kernels.

Two forms of the same semantics:
- ``dispatch_shard`` / ``combine_shard`` run per rank inside ``shard_map``
  over the EP axis and exchange data with ``all_to_all`` (which XLA:CPU
  supports, unlike ``ragged_all_to_all``);
- ``dispatch_global`` / ``combine_global`` take every rank's inputs stacked
  on a leading axis and need no collectives, so one process can compute the
  expected result of every rank (used by the multi-process GPU tests).

Conventions fixed here (and followed by the kernels):
- an expert id outside [0, E) sends nothing; -1 is the documented mask;
- a token naming one expert in two slots sends one message (the first slot),
  so an (expert, source rank) block never holds more than M rows;
- inside an expert's packed rows the blocks come in source-rank order and
  rows inside a block in token order (the kernels may order both freely);
- rows past ``recv_count`` are zeros and their ``src_info`` is -1.

Masked ranks (``masked``, a static tuple; see mask.py): a slot whose expert's owner is
masked sends nothing (as id -1) and adds nothing in combine; a masked rank sends and
receives nothing and its combine gives zeros. The other slots of a token still reduce
with their weights (no renormalisation).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from . import config as cfg
from . import mask

F8 = jnp.float8_e4m3fn
FP8_MAX = 448.0


class DispatchOut(NamedTuple):
    recv_x: jax.Array        # [LE, R*M, H] bf16 or f8e4m3fn
    recv_scales: jax.Array   # [LE, R*M, H/128] f32 (fp8) or [LE, R*M, 0]
    recv_count: jax.Array    # [LE] int32
    src_info: jax.Array      # [LE, R*M] int32
    layout_range: jax.Array  # int64[LE, R] or int32[LE, R, 2]


# ---------------------------------------------------------------- helpers

def valid_slots(topk_idx: jax.Array, num_experts: int) -> jax.Array:
    """[T, K] bool: slot sends a message (id in range and first occurrence in its row)."""
    in_range = _in_range(topk_idx, num_experts)
    idx = jnp.where(in_range, topk_idx, -1).astype(jnp.int32)
    k = idx.shape[1]
    earlier = jnp.tril(jnp.ones((k, k), bool), -1)  # [k, k']: k' < k
    dup = jnp.any((idx[:, :, None] == idx[:, None, :]) & earlier[None], axis=2)
    return in_range & ~dup


def combine_slots(topk_idx: jax.Array, num_experts: int) -> jax.Array:
    """[T, K] bool: slot contributes to combine (every in-range slot, duplicates too)."""
    return _in_range(topk_idx, num_experts)


def _in_range(topk_idx: jax.Array, num_experts: int) -> jax.Array:
    """In [0, E), compared in the ids' own dtype: an int64 id narrowed to int32 first
    could wrap into the range (2**32 + 3 -> 3); the kernels drop it, so do we."""
    return (topk_idx >= 0) & (topk_idx < num_experts)


def rank_index(axis_name):
    return 0 if axis_name is None else lax.axis_index(axis_name)


def unmasked_slots(topk_idx, num_experts: int, num_ranks: int, masked, rank) -> jax.Array:
    """[T, K] bool: the slot's expert is owned by an unmasked rank and this rank (``rank``,
    may be traced) is not masked itself. Ids outside [0, E) are left to the other checks."""
    if not masked:
        return jnp.ones(topk_idx.shape, bool)
    alive = jnp.asarray(mask.alive_table(num_experts, num_ranks, masked))
    owner_ok = alive[jnp.clip(topk_idx.astype(jnp.int32), 0, num_experts - 1)]
    return owner_ok & ~jnp.any(jnp.asarray(masked, jnp.int32) == rank)


def pack_layout(offset: jax.Array, count: jax.Array) -> jax.Array:
    """(offset << 32) | count as int64 with x64; otherwise the same bytes as int32 pairs."""
    offset = offset.astype(jnp.int32)
    count = count.astype(jnp.int32)
    if cfg.x64_enabled():
        return (offset.astype(jnp.int64) << 32) | count.astype(jnp.int64)
    return jnp.stack([count, offset], axis=-1)


def unpack_layout(layout_range: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inverse of pack_layout: (offset, count) as int32."""
    if layout_range.dtype == jnp.int64:
        count = (layout_range & 0xFFFFFFFF).astype(jnp.int32)
        offset = (layout_range >> 32).astype(jnp.int32)
        return offset, count
    return layout_range[..., 1], layout_range[..., 0]


def _pow2_ceil(s: jax.Array) -> jax.Array:
    """Smallest power of two >= s, for positive normal f32 s, exactly (bit arithmetic)."""
    bits = lax.bitcast_convert_type(s, jnp.uint32)
    exp = bits & jnp.uint32(0x7F800000)
    mant = bits & jnp.uint32(0x007FFFFF)
    up = jnp.where(mant != 0, exp + jnp.uint32(0x00800000), exp)
    return lax.bitcast_convert_type(up, jnp.float32)


def fp8_cast(x: jax.Array, round_scale: bool = False) -> tuple[jax.Array, jax.Array]:
    """Per-128-channel e4m3 cast: returns (q [T,H] f8e4m3fn, scale_inv [T,H/128] f32)."""
    t, h = x.shape
    xf = x.astype(jnp.float32).reshape(t, h // cfg.FP8_BLOCK, cfg.FP8_BLOCK)
    amax = jnp.maximum(jnp.max(jnp.abs(xf), axis=-1), jnp.float32(1e-4))
    # XLA turns a division by a broadcast constant into a multiplication by
    # its reciprocal (1 ulp off); a divisor that depends on the data keeps the
    # IEEE division the contract (and the kernels) use. amax is finite, so
    # amax * 0 is exactly 0.
    fp8_max = jnp.float32(FP8_MAX) + amax * jnp.float32(0.0)
    if round_scale:
        scale_inv = _pow2_ceil(amax / fp8_max)
        mul = jnp.float32(1.0) / scale_inv  # exact: a power of two
    else:
        scale_inv = amax / fp8_max
        mul = fp8_max / amax
    q = (xf * mul[..., None]).astype(F8).reshape(t, h)
    return q, scale_inv


def dequantize(recv_x: jax.Array, recv_scales: jax.Array) -> jax.Array:
    """f32 values of an fp8 recv_x ([..., H]) with its per-128 scales ([..., H/128])."""
    xf = recv_x.astype(jnp.float32)
    shape = xf.shape
    blocks = xf.reshape(shape[:-1] + (shape[-1] // cfg.FP8_BLOCK, cfg.FP8_BLOCK))
    return (blocks * recv_scales[..., None]).reshape(shape)


def _payload(x, use_fp8, round_scale):
    """(values to send [T,H], scales [T,S]) where S = H/128 for fp8, else 0."""
    t, h = x.shape
    if use_fp8:
        return fp8_cast(x, round_scale)
    return x, jnp.zeros((t, 0), jnp.float32)


def _slot_positions(topk_idx, num_experts, valid):
    """For each (t, k): position of token t inside its (expert, this rank) block."""
    t = topk_idx.shape[0]
    e_idx = jnp.where(valid, topk_idx.astype(jnp.int32), 0)
    onehot = (e_idx[:, :, None] == jnp.arange(num_experts)[None, None, :]) & valid[:, :, None]
    sent = jnp.any(onehot, axis=1).astype(jnp.int32)           # [T, E]
    before = jnp.cumsum(sent, axis=0) - sent                   # exclusive, [T, E]
    pos = jnp.take_along_axis(before, e_idx, axis=1)           # [T, K]
    counts = jnp.sum(sent, axis=0)                             # [E]
    return e_idx, pos, counts


def row_owner(offset, count, rows):
    """For each packed row of each local expert: (source rank, row valid)."""
    r = jnp.arange(rows)[None, None, :]
    inside = (r >= offset[:, :, None]) & (r < (offset + count)[:, :, None])   # [LE, R, rows]
    src = jnp.argmax(inside, axis=1).astype(jnp.int32)                         # [LE, rows]
    return src, jnp.any(inside, axis=1)


# ---------------------------------------------------------------- per shard

def axis_size(axis_name) -> int:
    if axis_name is None:
        return 1
    return lax.axis_size(axis_name)


def _send_blocks(x, topk_idx, num_experts, max_tokens, use_fp8, round_scale, keep):
    """One rank's messages grouped by destination expert: [E, M, ...] blocks + counts [E].
    keep [T, K]: the slots the mask lets through."""
    e, m = num_experts, max_tokens
    vals, scales = _payload(x, use_fp8, round_scale)
    valid = valid_slots(topk_idx, e) & keep
    e_idx, pos, counts = _slot_positions(topk_idx, e, valid)
    pos_w = jnp.where(valid, pos, m)  # out of bounds: dropped
    tok = jnp.broadcast_to(jnp.arange(x.shape[0], dtype=jnp.int32)[:, None], e_idx.shape)
    per_slot = lambda a: jnp.broadcast_to(a[:, None, :], e_idx.shape + a.shape[1:])
    bx = jnp.zeros((e, m) + vals.shape[1:], vals.dtype).at[e_idx, pos_w].set(
        per_slot(vals), mode="drop")
    bs = jnp.zeros((e, m) + scales.shape[1:], jnp.float32).at[e_idx, pos_w].set(
        per_slot(scales), mode="drop")
    bt = jnp.full((e, m), -1, jnp.int32).at[e_idx, pos_w].set(tok, mode="drop")
    return bx, bs, bt, counts


def dispatch_shard(x, topk_idx, *, num_experts: int, max_tokens: int, axis_name,
                   use_fp8: bool = False, round_scale: bool = False,
                   masked: tuple = ()) -> DispatchOut:
    """This rank's dispatch inside shard_map over ``axis_name`` (None: a single rank)."""
    num_ranks = axis_size(axis_name)
    m = max_tokens
    le = num_experts // num_ranks
    keep = unmasked_slots(topk_idx, num_experts, num_ranks, masked, rank_index(axis_name))
    bx, bs, bt, counts = _send_blocks(x, topk_idx, num_experts, m, use_fp8, round_scale, keep)
    by_rank = lambda a: a.reshape((num_ranks, le) + a.shape[1:])
    blocks = [by_rank(bx), by_rank(bs), by_rank(bt), counts.reshape(num_ranks, le)]
    if axis_name is not None and num_ranks > 1:
        blocks = [lax.all_to_all(a, axis_name, 0, 0, tiled=True) for a in blocks]
    return _pack_received(*blocks, num_ranks, m)


def _pack_received(recv, recv_s, recv_src, recv_cnt, num_ranks, m) -> DispatchOut:
    """[R(src), LE, M, ...] blocks -> packed [LE, R*M, ...] rows, source-rank order."""
    _, le, _, h = recv.shape
    s = recv_s.shape[-1]
    rows = num_ranks * m
    cnt = recv_cnt.T                                           # [LE, R]
    off = jnp.cumsum(cnt, axis=1) - cnt                        # exclusive over source ranks
    slot = jnp.arange(m)[None, None, :]
    dest = jnp.where(slot < cnt[:, :, None], off[:, :, None] + slot, rows)   # [LE, R, M]
    j = jnp.broadcast_to(jnp.arange(le)[:, None, None], dest.shape)
    blk = lambda a: jnp.moveaxis(a, 0, 1)                      # [R, LE, M, ...] -> [LE, R, M, ...]
    recv_x = jnp.zeros((le, rows, h), recv.dtype).at[j, dest].set(blk(recv), mode="drop")
    recv_scales = jnp.zeros((le, rows, s), jnp.float32).at[j, dest].set(blk(recv_s), mode="drop")
    src_info = jnp.full((le, rows), -1, jnp.int32).at[j, dest].set(blk(recv_src), mode="drop")
    recv_count = jnp.sum(cnt, axis=1).astype(jnp.int32)
    return DispatchOut(recv_x, recv_scales, recv_count, src_info, pack_layout(off, cnt))


def combine_shard(y, topk_idx, topk_weights, src_info, layout_range, *, num_experts: int,
                  max_tokens: int, axis_name, masked: tuple = ()):
    """This rank's combine inside shard_map: out[T, H] bf16."""
    num_ranks = axis_size(axis_name)
    le, rows, h = y.shape
    m, e = max_tokens, num_experts
    offset, count = unpack_layout(layout_range)                # [LE, R]
    src_rank, row_ok = row_owner(offset, count, rows)
    tok = jnp.where(row_ok & (src_info >= 0) & (src_info < m), src_info, m)
    j = jnp.broadcast_to(jnp.arange(le)[:, None], (le, rows))
    # Back buffer [R(dst = source rank), LE, M(token), H].
    back = jnp.zeros((num_ranks, le, m, h), y.dtype).at[src_rank, j, tok].set(y, mode="drop")
    if axis_name is not None and num_ranks > 1:
        back = lax.all_to_all(back, axis_name, 0, 0, tiled=True)   # [R(owner), LE, M, H]
    table = back.reshape(e, m, h)                               # [E, token, H]
    keep = unmasked_slots(topk_idx, e, num_ranks, masked, rank_index(axis_name))
    return _reduce(lambda ei, ti: table[ei, ti], topk_idx, topk_weights, e, keep)


def _reduce(fetch, topk_idx, topk_weights, num_experts, keep):
    """out[t] = sum_k w[t,k] * row(t, idx[t,k]), f32 accumulation, one bf16 rounding.

    fetch(e_idx [T, K], t_idx [T, 1]) returns the rows [T, K, H]; keep [T, K]: the slots
    the mask lets through.
    """
    t = topk_idx.shape[0]
    ok = combine_slots(topk_idx, num_experts) & keep
    e_idx = jnp.where(ok, topk_idx.astype(jnp.int32), 0)
    rows = fetch(e_idx, jnp.arange(t)[:, None]).astype(jnp.float32)
    w = jnp.where(ok, topk_weights, 0.0)
    acc = jnp.sum(jnp.where(ok[:, :, None], rows * w[:, :, None], 0.0), axis=1)
    return acc.astype(jnp.bfloat16)


# ---------------------------------------------------------------- global (no collectives)

def dispatch_global(x, topk_idx, *, num_experts: int, max_tokens: int, use_fp8: bool = False,
                    round_scale: bool = False, masked: tuple = ()) -> DispatchOut:
    """Every rank's dispatch at once: x [R, T, H], topk_idx [R, T, K] -> outputs with a leading R."""
    x, topk_idx = jnp.asarray(x), jnp.asarray(topk_idx)
    num_ranks = x.shape[0]
    e, m = num_experts, max_tokens
    le = e // num_ranks

    def send(xr, ir, rank):
        keep = unmasked_slots(ir, e, num_ranks, masked, rank)
        return _send_blocks(xr, ir, e, m, use_fp8, round_scale, keep)
    bx, bs, bt, counts = jax.vmap(send)(x, topk_idx, jnp.arange(num_ranks))   # [R(src), E, M, ...]
    # Regroup by destination: [R(dst), R(src), LE, M, ...].
    to_dst = lambda a: jnp.moveaxis(a.reshape((num_ranks, num_ranks, le) + a.shape[2:]), 1, 0)
    recv, recv_s, recv_src = to_dst(bx), to_dst(bs), to_dst(bt)
    recv_cnt = jnp.moveaxis(counts.reshape(num_ranks, num_ranks, le), 1, 0)   # [dst, src, LE]
    pack = lambda a, b, c, d: _pack_received(a, b, c, d, num_ranks, m)
    return DispatchOut(*jax.vmap(pack)(recv, recv_s, recv_src, recv_cnt))


def combine_global(y, topk_idx, topk_weights, src_info, layout_range, *, num_experts: int,
                   max_tokens: int, masked: tuple = ()):
    """Every rank's combine at once: y [R, LE, R*M, H] -> out [R, T, H] bf16.

    Works with any valid handle (the kernels' row order included): each
    (source rank, expert, token) finds its row through the handle.
    """
    y, src_info, layout_range = map(jnp.asarray, (y, src_info, layout_range))
    num_ranks, le, rows, h = y.shape
    e, m = num_experts, max_tokens
    offset, count = unpack_layout(layout_range)                   # [R(owner), LE, R(src)]
    src_rank, row_ok = jax.vmap(lambda o, c: row_owner(o, c, rows))(offset, count)
    tok = jnp.where(row_ok & (src_info >= 0) & (src_info < m), src_info, m)
    # rowmap[src, owner*LE + j, token] = flat index of y[owner, j, row]
    owner = jnp.broadcast_to(jnp.arange(num_ranks)[:, None, None], src_rank.shape)
    j = jnp.broadcast_to(jnp.arange(le)[None, :, None], src_rank.shape)
    flat = jnp.arange(num_ranks * le * rows, dtype=jnp.int32).reshape(src_rank.shape)
    rowmap = jnp.zeros((num_ranks, e, m), jnp.int32).at[src_rank, owner * le + j, tok].set(
        flat, mode="drop")
    y_flat = y.reshape(-1, h)

    def one_rank(rm, ir, wr, rank):
        keep = unmasked_slots(ir, e, num_ranks, masked, rank)
        return _reduce(lambda ei, ti: y_flat[rm[ei, ti]], ir, wr, e, keep)

    return jax.vmap(one_rank)(rowmap, topk_idx, topk_weights, jnp.arange(num_ranks))
