"""Combine's backward exchanges and jax.grad through dispatch/combine, on the group's
Buffer, against NumPy loops and autodiff of the pure-JAX reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import lax

import _ep_util as u
import jax_mscclpp_ep as ep
from jax_mscclpp_ep import testing
from jax_mscclpp_ep.exchanges import gather_rows_p, scatter_to_rows_p
from ll_check import BF16, F32, expert_scales, inputs

E, M, H, K = 64, 128, 2048, 8
COMPILED = {}  # one compiled step per (kind of step, Buffer): the parametrized cases share it


def bwd_fn(group, buf):
    """Forward dispatch, then combine's backward exchanges on the same handle.

    gather_rows reads y built from the handle: the row of (source s, token t) for expert
    ex holds bf16(a[ex, s, t] * v), so any rank can tell what each slot must get back
    without the owner's row order."""
    r, le = group.num_ranks, E // group.num_ranks
    kw = dict(num_experts=E, max_tokens=M, num_ranks=r, axis_name="ep", buffer_id=buf.id,
              masked=buf.trace_mask())

    def fn(xs, ids, ws, gs, a, v):
        res = ep.dispatch(xs, ids, buf)
        src, lr = res.handle.src_info, res.handle.layout_range
        rows, order = scatter_to_rows_p.bind(gs.astype(BF16), ids, ws, src, lr, res.handle.order,
                                             **kw)
        s_of, ok = ep.reference.row_owner(*ep.reference.unpack_layout(lr), r * M)
        ex = lax.axis_index("ep") * le + jnp.arange(le)[:, None]
        scale = jnp.where(ok, a[ex, s_of, jnp.clip(src, 0, M - 1)], jnp.nan)  # NaN: never read
        ys = (scale[..., None] * v[None, None, :]).astype(BF16)
        per_slot, _ = gather_rows_p.bind(ys, ids, src, lr, order, **kw)
        return src, lr, rows, per_slot
    return group.sharded(fn)


def scatter_expected(r, idx, w, g, src, lr, owner):
    """NumPy loops: the rows scatter_to_rows must give rank `owner`, in its handle's order."""
    le = E // r
    offset, count = testing.layout_numpy(lr)
    want = np.zeros((le, r * M, g.shape[-1]), np.float32)
    for j in range(le):
        ex = owner * le + j
        for s in range(r):
            for i in range(int(offset[j, s]), int(offset[j, s] + count[j, s])):
                t = int(src[j, i])
                wt = np.float32(0)
                for k in range(idx.shape[-1]):  # duplicate slots add up, in slot order
                    if idx[s, t, k] == ex:
                        wt = np.float32(wt + w[s, t, k])
                want[j, i] = g[s, t].astype(np.float32) * wt
    return want.astype(ml_dtypes.bfloat16).astype(np.float32)


# T = 3: the dispatch kernel's slots come from the ids below 5 tokens (ll_dispatch.cu).
@pytest.mark.parametrize("routing,t", [("random", M), ("dups", M), ("one_expert", M),
                                       ("remote", M), ("dups", 3), ("one_expert", 3)],
                         ids=["random", "dups", "one_expert", "remote", "dups-T3",
                              "one_expert-T3"])
def test_backward_exchanges(group, rng, routing, t):
    """combine's backward, exactly: scatter_to_rows rows (weighted, in the forward handle's
    order, zeros elsewhere) and gather_rows per-slot rows (zeros if masked)."""
    r, buf = group.num_ranks, group.buffer(E, M, H)
    f = COMPILED.setdefault(("bwd", buf.id), bwd_fn(group, buf))
    x, idx, w = inputs(rng, r, t, H, K, E, routing=routing)
    g = rng.standard_normal((r, t, H)).astype(ml_dtypes.bfloat16)
    a = rng.uniform(0.5, 2.0, (E, r, M)).astype(np.float32)
    v = rng.standard_normal(H).astype(np.float32)
    rep = lambda z: np.broadcast_to(z, (r,) + z.shape)
    src, lr, rows, per_slot = (group.local(o) for o in f(*(group.put(z) for z in (
        x, idx, w, g, rep(a), rep(v)))))
    for rank in src:
        want = scatter_expected(r, idx, w, g, src[rank], lr[rank], rank)
        # Exact but for the order of adding 3+ duplicate slots' weights (1 ulp).
        np.testing.assert_allclose(rows[rank].astype(np.float32), want, rtol=2.0 ** -8, atol=0,
                                   err_msg=f"scatter_to_rows ({routing}) rank {rank}")
        ok = (idx[rank] >= 0) & (idx[rank] < E)
        ex = np.where(ok, idx[rank], 0)
        scale = np.where(ok, a[ex, rank, np.arange(t)[:, None]], 0.0).astype(np.float32)
        want_g = (scale[..., None] * v).astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(per_slot[rank].astype(np.float32), want_g,
                                      f"gather_rows ({routing}) rank {rank}")
    buf.check()


def masked_rows(recv_x, recv_count, rows):
    """recv_x in f32 with the rows past each expert's count zeroed (they hold no token)."""
    valid = (jnp.arange(rows)[None, :] < recv_count[:, None])[..., None]
    return jnp.where(valid, recv_x.astype(F32), 0.0)


def grad_fn(group, buf, split):
    r = group.num_ranks

    def shard_loss(xs, ws, cs, ids, gs):
        if split:  # the halves differentiate like the whole calls
            res = ep.dispatch_recv(ep.dispatch_send(xs, ids, buf))
            comb = lambda y: ep.combine_recv(ep.combine_send(y, ids, ws, res.handle, buf))
        else:
            res = ep.dispatch(xs, ids, buf)
            comb = lambda y: ep.combine(y, ids, ws, res.handle, buf)
        y = (masked_rows(res.recv_x, res.recv_count, r * M) * cs[:, None, None]).astype(BF16)
        return jnp.sum(comb(y).astype(F32) * gs)

    return group.sharded(lambda xs, ids, ws, cs, gs: jax.grad(shard_loss, argnums=(0, 1, 2))(
        xs, ws, cs, ids, gs))


def ref_loss(x, w, c, idx, g):
    r = x.shape[0]
    d = ep.reference.dispatch_global(x, idx, num_experts=E, max_tokens=M)
    y = jax.vmap(lambda rx, rc, cc: masked_rows(rx, rc, r * M) * cc[:, None, None])(
        d.recv_x, d.recv_count, c).astype(BF16)
    out = ep.reference.combine_global(y, idx, w, d.src_info, d.layout_range, num_experts=E,
                                      max_tokens=M)
    return jnp.sum(out.astype(F32) * g)


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
@pytest.mark.parametrize("routing", ["random", "dups"])
def test_grad(group, rng, routing, split):
    """jax.grad through dispatch/combine vs autodiff of the pure-JAX reference."""
    r, buf = group.num_ranks, group.buffer(E, M, H)
    f = COMPILED.setdefault(("grad", split, buf.id), grad_fn(group, buf, split))
    x, idx, w = inputs(rng, r, M, H, K, E, routing=routing)
    c = expert_scales(rng, group, buf)
    g = rng.standard_normal((r, M, H)).astype(np.float32)
    got = [group.local(o) for o in f(*(group.put(z) for z in (x, idx, w, c, g)))]
    with jax.default_device(group.cpu):
        want = jax.tree.map(np.asarray, jax.grad(ref_loss, argnums=(0, 1, 2))(
            *(jnp.asarray(z) for z in (x, w, c, idx, g))))
    for name, gg, ww in zip(("x", "topk_weights", "expert scale"), got, want):
        for rank in gg:
            tag = f"grad {name} ({routing}{', split' if split else ''}) rank {rank}"
            assert np.all(np.isfinite(gg[rank].astype(np.float32))), f"{tag}: non-finite"
            err = u.norm_rel_err(gg[rank], ww[rank])
            assert err < 1e-2, f"{tag}: norm rel err {err:.3g}"
    buf.check()
