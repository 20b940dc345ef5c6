"""An expert-parallel MoE layer: router -> dispatch -> local expert FFNs -> combine.

Pure functions over a params pytree (a dict):
    router [H, E] f32, w_in [E, H, F] f32, w_out [E, F, H] f32 (expert e: silu(x w_in) w_out).
``moe_layer`` runs per rank inside ``jax.shard_map``: it gets this rank's
tokens [T, H] and this rank's expert slices (w_in/w_out sharded on the expert
axis, ``param_specs``), and exchanges tokens over the EP axis. Beside the EP
axis a data-parallel axis may shard the tokens further (mesh ("dp", "ep"):
each dp group is its own EP group). ``sharded_moe`` builds that shard_map.
``moe_dense`` is the same model without expert parallelism, with the same
bf16 roundings (the oracle of the tests and of examples/train_moe.py).

Three expert FFNs (``moe_layer(ffn=...)``), equal up to f32 summation order;
dispatch packs each expert's valid rows at the front of its R*M-row block:
  "masked":   a batched matmul over the whole [LE, R*M, H] layout, rows past
              ``recv_count`` zeroed: LE*R*M rows of work for about M*K valid ones.
  "bucketed": the same over the first B rows of every block, B the smallest of a
              few static sizes (R*M/16, /8, /4, /2, all) that holds the fullest
              expert, picked on the device with ``lax.switch``: exact for any
              routing, and a fraction of the work for balanced routing.
  "ragged":   the valid rows gathered into one [R*M*min(K, LE), H] array and
              ``lax.ragged_dot``: least work where the backend has a grouped
              matmul; XLA:GPU (jax 0.11) expands it to padded batched matmuls,
              which is slower than "masked" (benchmarks/results/ffn_h200x1.md).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from . import api, reference


def init_params(key, hidden: int, ffn: int, num_experts: int, *, scale: float = 1.0) -> dict:
    """Random params (f32): router [H, E], w_in [E, H, F], w_out [E, F, H]."""
    kr, ki, ko = jax.random.split(key, 3)
    return {
        "router": jax.random.normal(kr, (hidden, num_experts), jnp.float32) * (scale / hidden ** 0.5),
        "w_in": jax.random.normal(ki, (num_experts, hidden, ffn), jnp.float32) * (scale / hidden ** 0.5),
        "w_out": jax.random.normal(ko, (num_experts, ffn, hidden), jnp.float32) * (scale / ffn ** 0.5),
    }


def param_specs(ep_axis: str = "ep") -> dict:
    """shard_map specs of the params: the router is replicated, the experts split over ep_axis."""
    return {"router": P(), "w_in": P(ep_axis), "w_out": P(ep_axis)}


def route(router, x, top_k: int, score: str = "softmax", normalize: bool = True):
    """(topk_idx [T, K] int32, topk_weights [T, K] f32) from softmax or sigmoid scores."""
    logits = jnp.dot(x.astype(jnp.float32), router, precision=lax.Precision.HIGHEST)
    if score == "softmax":
        s = jax.nn.softmax(logits, axis=-1)
    elif score == "sigmoid":
        s = jax.nn.sigmoid(logits)
    else:
        raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")
    w, idx = lax.top_k(s, top_k)
    if normalize:
        w = w / jnp.sum(w, axis=-1, keepdims=True)
    return idx.astype(jnp.int32), w.astype(jnp.float32)


def expert_ffn(rows, w_in, w_out, counts: Optional[jax.Array] = None):
    """silu(rows w_in) w_out per expert: rows [G, N, H] bf16 -> [G, N, H] bf16.

    counts [G]: only rows [0, counts[g]) are valid (dispatch packs them at the
    front); the others are zeroed on the way in and out, so whatever the
    kernels left there (even NaN) reaches neither the output nor a gradient.
    """
    if counts is not None:
        valid = (jnp.arange(rows.shape[1])[None, :] < counts[:, None])[..., None]
        rows = jnp.where(valid, rows, jnp.zeros((), rows.dtype))
    hid = jnp.einsum("gnh,ghf->gnf", rows, w_in.astype(jnp.bfloat16),
                     preferred_element_type=jnp.float32)
    hid = jax.nn.silu(hid).astype(jnp.bfloat16)
    out = jnp.einsum("gnf,gfh->gnh", hid, w_out.astype(jnp.bfloat16),
                     preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    if counts is not None:
        out = jnp.where(valid, out, jnp.zeros((), out.dtype))
    return out


def packed_capacity(num_ranks: int, max_tokens: int, top_k: int, local_experts: int) -> int:
    """Most rows dispatch can deliver to one rank: each of the R*M source tokens
    sends at most one message per distinct local expert."""
    return num_ranks * max_tokens * min(top_k, local_experts)


def expert_ffn_ragged(rows, w_in, w_out, counts, capacity: int):
    """``expert_ffn`` over the valid rows only: rows [G, N, H] bf16 -> [G, N, H] bf16.

    Rows [0, counts[g]) of each group are gathered into a [C, H] array
    (C = min(capacity, G*N), group after group), multiplied with
    ``lax.ragged_dot`` and gathered back; rows past counts[g] come out zero
    (and take no gradient), like ``expert_ffn(..., counts)``. capacity must
    bound sum(counts) (``packed_capacity``); rows beyond it would be zeroed.
    """
    g_, n_, h_ = rows.shape
    c_ = int(min(capacity, g_ * n_))
    if c_ == 0:  # no row can be valid (and there is no packed row to gather back from)
        return jnp.zeros_like(rows)
    counts = jnp.clip(counts.astype(jnp.int32), 0, n_)
    ends = jnp.minimum(jnp.cumsum(counts), c_)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    sizes = ends - starts                                   # sums to <= C, as ragged_dot needs
    # packed position p -> its group and that group's row
    p = jnp.arange(c_, dtype=jnp.int32)
    grp = jnp.minimum(jnp.searchsorted(ends, p, side="right").astype(jnp.int32), g_ - 1)
    live = p < ends[-1]
    src = jnp.where(live, grp * n_ + p - starts[grp], 0)
    packed = jnp.where(live[:, None], rows.reshape(g_ * n_, h_)[src], jnp.zeros((), rows.dtype))
    hid = lax.ragged_dot(packed, w_in.astype(jnp.bfloat16), sizes,
                         preferred_element_type=jnp.float32)
    hid = jax.nn.silu(hid).astype(jnp.bfloat16)
    out = lax.ragged_dot(hid, w_out.astype(jnp.bfloat16), sizes,
                         preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    # layout row (g, i) <- packed row starts[g] + i while i < sizes[g]
    i = jnp.arange(n_, dtype=jnp.int32)[None, :]
    valid = i < sizes[:, None]
    dst = jnp.where(valid, starts[:, None] + i, 0)
    return jnp.where(valid[..., None], out[dst], jnp.zeros((), out.dtype))


def bucket_sizes(n: int, buckets=None) -> tuple:
    """The static row counts ``expert_ffn_bucketed`` chooses from (ascending, last = n)."""
    if buckets is None:
        buckets = [n // d for d in (16, 8, 4, 2)]
    sizes = {min(n, max(8, -(-int(b) // 8) * 8)) for b in buckets if int(b) > 0}  # multiples of 8
    return tuple(sorted(sizes | {n}))


def expert_ffn_bucketed(rows, w_in, w_out, counts, buckets=None):
    """``expert_ffn(rows, w_in, w_out, counts)`` over the first B rows of each group only.

    B is the smallest of ``bucket_sizes(N, buckets)`` with B >= max(counts),
    chosen on the device (``lax.switch``; every size is compiled, one runs);
    rows past B are valid in no group and come out zero. Under ``vmap`` the
    switch becomes a select that runs every size: use "masked" there.
    """
    n = rows.shape[1]
    sizes = bucket_sizes(n, buckets)
    need = jnp.max(jnp.clip(counts.astype(jnp.int32), 0, n), initial=0)
    which = jnp.sum(need > jnp.asarray(sizes[:-1], jnp.int32)).astype(jnp.int32)

    def run(b):
        def branch(r, wi, wo, c):
            out = expert_ffn(r[:, :b], wi, wo, c)
            return jnp.pad(out, ((0, 0), (0, n - b), (0, 0))) if b < n else out
        return branch

    return lax.switch(which, [run(b) for b in sizes], rows, w_in, w_out, counts)


_FFNS = ("bucketed", "masked", "ragged")


def moe_layer(params, x, buffer, *, top_k: int, score: str = "softmax", normalize: bool = True,
              axis_name=api.BUFFER_AXIS, use_fp8: bool = False, token_mask=None, after=None,
              return_order: bool = False, ffn: str = "bucketed"):
    """This rank's MoE output [T, H] bf16 (call inside shard_map over the EP axis).

    params: this rank's shard (router [H, E], w_in [LE, H, F], w_out [LE, F, H]).
    x: [T, H] (cast to bf16 for the exchange); buffer: Buffer or EPConfig.
    use_fp8: fp8 dispatch, differentiated straight-through (see autodiff.py).
    token_mask: optional [T] bool; masked tokens (padding) send nothing and get zeros,
    so a fixed-shape step can carry a varying number of live tokens.
    after / return_order: order tokens to chain with other calls on the buffer.
    ffn: "bucketed" (default), "masked" or "ragged": see the module docstring.
    """
    if ffn not in _FFNS:
        raise ValueError(f"ffn must be one of {_FFNS}, got {ffn!r}")
    idx, w = route(params["router"], x, top_k, score, normalize)
    if token_mask is not None:
        idx = jnp.where(token_mask[:, None], idx, -1)
    res = api.dispatch(x.astype(jnp.bfloat16), idx, buffer, axis_name=axis_name, use_fp8=use_fp8,
                       dequantize=use_fp8, after=after)
    rows, w_in, w_out, counts = res.recv_x, params["w_in"], params["w_out"], res.recv_count
    if ffn == "ragged":
        le, rm = rows.shape[0], rows.shape[1]
        m = api.resolve(buffer, axis_name)[0].max_tokens_per_rank
        y = expert_ffn_ragged(rows, w_in, w_out, counts, packed_capacity(rm // m, m, top_k, le))
    elif ffn == "bucketed":
        y = expert_ffn_bucketed(rows, w_in, w_out, counts)
    else:
        y = expert_ffn(rows, w_in, w_out, counts)
    return api.combine(y, idx, w, res.handle, buffer, axis_name=axis_name,
                       return_order=return_order)


def moe_dense(params, x, *, top_k: int, score: str = "softmax", normalize: bool = True,
              use_fp8: bool = False, token_mask=None):
    """The same MoE without expert parallelism: x [N, H] through all experts, then selected."""
    idx, w = route(params["router"], x, top_k, score, normalize)
    if token_mask is not None:
        w = jnp.where(token_mask[:, None], w, 0.0)
    xb = x.astype(jnp.bfloat16)
    if use_fp8:  # straight-through, like the fp8 dispatch's derivative
        deq = reference.dequantize(*reference.fp8_cast(xb)).astype(jnp.bfloat16)
        xb = lax.stop_gradient(deq) + (xb - lax.stop_gradient(xb))   # value: exactly deq
    e, n = params["w_in"].shape[0], x.shape[0]
    every = expert_ffn(jnp.broadcast_to(xb[None], (e,) + xb.shape), params["w_in"],
                       params["w_out"])                                   # [E, N, H]
    rows = every[idx, jnp.arange(n)[:, None]].astype(jnp.float32)         # [N, K, H]
    return jnp.sum(rows * w[..., None], axis=1).astype(jnp.bfloat16)


def token_spec(mesh, ep_axis: str = "ep", dp_axis: Optional[str] = None) -> P:
    """How tokens [N, ...] are split: over (dp, ep) when there is a dp axis, else over ep."""
    del mesh
    return P((dp_axis, ep_axis)) if dp_axis is not None else P(ep_axis)


def sharded_moe(mesh, buffer, *, top_k: int, ep_axis: str = "ep", dp_axis: Optional[str] = None,
                **kw):
    """f(params, x [N, H]) -> [N, H] bf16: moe_layer under shard_map on ``mesh``.

    Tokens are split over (dp_axis, ep_axis), experts over ep_axis (replicated
    over dp_axis); N must be a multiple of the number of devices it is split on.
    """
    spec = token_spec(mesh, ep_axis, dp_axis)

    def body(params, x):
        return moe_layer(params, x, buffer, top_k=top_k, axis_name=ep_axis, **kw)

    return jax.shard_map(body, mesh=mesh, in_specs=(param_specs(ep_axis), spec), out_specs=spec)
