"""One LL step (dispatch, then combine of the received rows) over a group, and its
check against the pure-JAX reference computed here for every rank: the rows of each
(expert, source rank) block after ordering by src_info, counts, stats, combine."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import _ep_util as u
import jax_mscclpp_ep as ep
from jax_mscclpp_ep import testing

BF16, F32 = jnp.bfloat16, jnp.float32
ROUTINGS = ("random", "one_expert", "remote", "local", "dups", "masked", "wide")


def inputs(rng, r, t, h, k, e, *, routing="random", idx_dtype=np.int32):
    """x [R,T,H] bf16 (never zeros), weights [R,T,K] > 0, and topk_idx [R,T,K] of one of
    ROUTINGS: random distinct experts (20 % masked), every token to one expert, only
    other ranks' experts, only this rank's, repeats and ids outside [-1, E), all -1, or
    (int64 only) "dups" with a third of the ids moved by +-2**32: their low word is an
    id in range, the whole id is not (the kernels narrow ids to 32 bits)."""
    x, idx, w = u.make_inputs(rng, r, t, h, k, e, idx_dtype=np.int64)
    w = w * np.float32(0.9) + np.float32(0.1)  # > 0: every valid slot counts in combine
    le = e // r
    if routing == "one_expert":
        idx = np.full_like(idx, -1)
        idx[:, :, 0] = 5 % e
    elif routing in ("remote", "local"):
        for rank in range(r):
            for tok in range(t):
                owner = rank
                if routing == "remote" and r > 1:
                    owner = (rank + 1 + rng.integers(0, r - 1)) % r
                idx[rank, tok] = owner * le + rng.permutation(le)[:k]
        idx = np.where(rng.random(idx.shape) < 0.2, -1, idx)
    elif routing == "dups":
        idx = rng.integers(-3, e + 3, size=idx.shape)
    elif routing == "masked":
        idx = np.full_like(idx, -1)
    elif routing == "wide":
        assert idx_dtype == np.int64, "wide ids need int64"
        idx = rng.integers(-3, e + 3, size=idx.shape)
        shift = rng.choice(np.array([0, 1 << 32, -(1 << 32)], np.int64), size=idx.shape,
                           p=[2 / 3, 1 / 6, 1 / 6])
        idx = idx + shift
    return x, idx.astype(idx_dtype), w


def y_of(recv_x, recv_scales, c, use_fp8):
    """Expert 'output' for combine: the received row, dequantised, times a per-expert constant."""
    rx = ep.dequantize(recv_x, recv_scales) if use_fp8 else recv_x.astype(F32)
    return (rx * c[:, None, None]).astype(BF16)


def _outputs(buf, r, res, out, use_fp8):
    le, m = buf.config.num_experts // r, buf.config.max_tokens_per_rank
    sc = res.recv_scales if use_fp8 else jnp.zeros((le, r * m, 0), F32)
    return (res.recv_x, sc, res.recv_count, res.handle.src_info, res.handle.layout_range,
            res.stats, out)


def step_fn(group, buf, use_fp8, round_scale):
    r, le = group.num_ranks, buf.config.num_experts // group.num_ranks

    def fn(xs, ids, ws, cs):
        res = ep.dispatch(xs, ids, buf, use_fp8=use_fp8, round_scale=round_scale,
                          stats=jnp.zeros((le,), jnp.int32))
        out = ep.combine(y_of(res.recv_x, res.recv_scales, cs, use_fp8), ids, ws, res.handle, buf)
        return _outputs(buf, r, res, out, use_fp8)
    return group.sharded(fn)


def split_step_fn(group, buf, use_fp8):
    """step_fn through the split halves, other work between each send and its receive."""
    r, le = group.num_ranks, buf.config.num_experts // group.num_ranks

    def fn(xs, ids, ws, cs):
        pend = ep.dispatch_send(xs, ids, buf, use_fp8=use_fp8, stats=jnp.zeros((le,), jnp.int32))
        busy = jnp.tanh(xs.astype(F32) @ xs.astype(F32).T).sum()
        res = ep.dispatch_recv(pend)
        pc = ep.combine_send(y_of(res.recv_x, res.recv_scales, cs, use_fp8), ids, ws, res.handle,
                             buf)
        busy = busy + jnp.tanh(ws @ ws.T).sum()
        out = ep.combine_recv(pc) + (busy * 0).astype(BF16)
        return _outputs(buf, r, res, out, use_fp8)
    return group.sharded(fn)


@functools.lru_cache(maxsize=None)
def reference_fn(e, m, use_fp8, round_scale, masked=()):
    """jit((x, idx, w, c) -> (reference dispatch of every rank, reference combine [R,T,H]))
    with ``masked`` ranks masked; compiled once per shape, so a loop can check every step."""
    def fn(x, idx, w, c):
        ref = ep.reference.dispatch_global(x, idx, num_experts=e, max_tokens=m, use_fp8=use_fp8,
                                           round_scale=round_scale, masked=masked)
        y = jax.vmap(lambda a, b, cc: y_of(a, b, cc, use_fp8))(ref.recv_x, ref.recv_scales, c)
        out = ep.reference.combine_global(y, idx, w, ref.src_info, ref.layout_range,
                                          num_experts=e, max_tokens=m, masked=masked)
        return ref, out
    return jax.jit(fn)


def expected(group, buf, x, idx, w, c, use_fp8, round_scale, masked=()):
    """(reference dispatch of every rank, reference combine [R,T,H]) on this process's CPU."""
    f = reference_fn(buf.config.num_experts, buf.config.max_tokens_per_rank, use_fp8,
                     round_scale, tuple(masked))
    with jax.default_device(group.cpu):
        ref, out = f(*(jnp.asarray(a) for a in (x, idx, w, c)))
        return jax.tree.map(np.asarray, ref), np.asarray(out)


def expert_scales(rng, group, buf):
    return rng.uniform(0.5, 2.0, (group.num_ranks, buf.config.num_experts // group.num_ranks)
                       ).astype(np.float32)


def check_outputs(buf, got, ref, out_ref, use_fp8):
    """This process's ranks of one step's outputs ({rank: numpy} each, as step_fn returns
    them) against the reference."""
    m = buf.config.max_tokens_per_rank
    for r in got[0]:
        rx, sc, cnt, src, lr, stats, out = (g[r] for g in got)
        have = testing.normalize_dispatch(rx, sc if use_fp8 else None, cnt, src, lr, m)
        want = testing.normalize_dispatch(ref.recv_x[r], ref.recv_scales[r] if use_fp8 else None,
                                          ref.recv_count[r], ref.src_info[r], ref.layout_range[r], m)
        testing.assert_dispatch_equal(have, want)
        np.testing.assert_array_equal(stats, cnt, "stats_out = stats + recv_count")
        check_combine(out, out_ref[r], f"combine, rank {r}")


def check_combine(out, want, what):
    a, b = out.astype(np.float32), want.astype(np.float32)
    assert np.all(np.isfinite(a)), f"{what}: non-finite values"
    np.testing.assert_allclose(a, b, rtol=2.0 ** -7, atol=1e-6, err_msg=what)


def check_step(group, rng, buf, x, idx, w, *, use_fp8=False, round_scale=False, fn=None,
               masked=()):
    """Run one step (fn, or a new step_fn) and check this process's ranks against the
    reference with ``masked`` ranks masked; returns fn so a case can replay the compiled
    step with fresh data."""
    c = expert_scales(rng, group, buf)
    fn = fn or step_fn(group, buf, use_fp8, round_scale)
    got = [group.local(o) for o in fn(*(group.put(a) for a in (x, idx, w, c)))]
    check_outputs(buf, got, *expected(group, buf, x, idx, w, c, use_fp8, round_scale, masked),
                  use_fp8)
    buf.check()
    return fn
