"""Shared helpers for the CPU tests: inputs, shard_map runners, NumPy oracles."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

import jax_mscclpp_ep as ep
from jax_mscclpp_ep import testing


def fresh_rng():
    """A new seed every run (never the same data twice); printed in failures."""
    seed = int.from_bytes(os.urandom(4), "little")
    return np.random.default_rng(seed), seed


def make_inputs(rng, r, t, h, k, e, *, mask_frac=0.2, idx_dtype=np.int32):
    """x [R,T,H] bf16 (random, never zeros), topk_idx [R,T,K] distinct experts, weights f32."""
    x = rng.standard_normal((r, t, h)).astype(np.float32) * rng.uniform(0.5, 4.0)
    x = x.astype(ml_dtypes.bfloat16)
    idx = np.stack([np.stack([rng.permutation(e)[:k] for _ in range(t)]) for _ in range(r)]) \
        if t else np.zeros((r, 0, k), np.int64)
    idx = np.where(rng.random((r, t, k)) < mask_frac, -1, idx).astype(idx_dtype)
    w = rng.random((r, t, k)).astype(np.float32)
    return x, idx, w


def rel_err(a, b):
    """max |a - b| / max |b| in f32."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def norm_rel_err(a, b):
    """||a - b|| / ||b|| in f32."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def mesh_of(r):
    return Mesh(np.array(jax.devices("cpu")[:r]), ("ep",))


def shard_run(r, fn, *args, mesh=None):
    """Run fn per rank under jit(shard_map) over r CPU devices (or ``mesh``, axis "ep");
    args/outs stacked on axis 0."""
    def body(*a):
        out = fn(*[v[0] for v in a])
        return jax.tree.map(lambda o: o[None], out)

    f = jax.jit(jax.shard_map(body, mesh=mesh_of(r) if mesh is None else mesh, in_specs=P("ep"),
                              out_specs=P("ep")))
    return jax.tree.map(np.asarray, f(*[jnp.asarray(a) for a in args]))


def run_dispatch(config, x, idx, **kw):
    r = x.shape[0]

    def fn(xs, ids):
        res = ep.dispatch(xs, ids, config, **kw)
        scales = res.recv_scales if res.recv_scales is not None else jnp.zeros((0,), jnp.float32)
        return res.recv_x, scales, res.recv_count, res.handle.src_info, res.handle.layout_range

    return shard_run(r, fn, x, idx)


def canonical_ranks(outs, max_tokens, use_fp8):
    recv_x, scales, count, src, lr = outs
    return [testing.normalize_dispatch(recv_x[i], scales[i] if use_fp8 else None, count[i],
                                       src[i], lr[i], max_tokens) for i in range(recv_x.shape[0])]


# ---------------------------------------------------------------- NumPy oracles (plain loops)

def np_fp8(x_row, round_scale):
    """Per-128 e4m3 cast of one token, written independently of the JAX reference."""
    h = x_row.shape[0]
    q = np.zeros(h, ml_dtypes.float8_e4m3fn)
    s = np.zeros(h // 128, np.float32)
    for b in range(h // 128):
        blk = x_row[b * 128:(b + 1) * 128].astype(np.float32)
        amax = np.float32(max(float(np.max(np.abs(blk))), 1e-4))
        if round_scale:
            frac, ex = np.frexp(amax / np.float32(448.0))
            sinv = np.float32(2.0 ** (ex - 1)) if frac == 0.5 else np.float32(2.0 ** ex)
            mul = np.float32(1.0) / sinv
        else:
            sinv = amax / np.float32(448.0)
            mul = np.float32(448.0) / amax
        q[b * 128:(b + 1) * 128] = (blk * mul).astype(ml_dtypes.float8_e4m3fn)
        s[b] = sinv
    return q, s


def oracle_dispatch(x, idx, e, m, use_fp8=False, round_scale=False):
    """Canonical dispatch result per destination rank, by plain loops over (src, token, slot)."""
    r, t, h = x.shape
    le = e // r
    s_dim = h // 128 if use_fp8 else 0
    out = []
    for dst in range(r):
        cx = np.zeros((le, r, m, h), ml_dtypes.float8_e4m3fn if use_fp8 else x.dtype)
        cs = np.zeros((le, r, m, s_dim), np.float32)
        ct = np.full((le, r, m), -1, np.int64)
        cnt = np.zeros((le, r), np.int64)
        for j in range(le):
            expert = dst * le + j
            for src in range(r):
                for tok in range(t):
                    if any(int(idx[src, tok, kk]) == expert for kk in range(idx.shape[2])):
                        n = cnt[j, src]
                        if use_fp8:
                            cx[j, src, n], cs[j, src, n] = np_fp8(x[src, tok], round_scale)
                        else:
                            cx[j, src, n] = x[src, tok]
                        ct[j, src, n] = tok
                        cnt[j, src] += 1
        out.append(testing.Canonical(cx, cs, ct, cnt, cnt.sum(axis=1)))
    return out


def oracle_combine(y, idx, w, src_info, layout_range, e, m):
    """out [R, T, H] bf16: f32 sum over valid slots of w * (the row holding (token, expert))."""
    r, le, rows, h = y.shape
    t, k = idx.shape[1], idx.shape[2]
    where = {}
    for owner in range(r):
        off, cnt = testing.layout_numpy(layout_range[owner])
        for j in range(le):
            for src in range(r):
                for row in range(off[j, src], off[j, src] + cnt[j, src]):
                    where[(src, int(src_info[owner, j, row]), owner * le + j)] = (owner, j, row)
    out = np.zeros((r, t, h), np.float32)
    for src in range(r):
        for tok in range(t):
            acc = np.zeros(h, np.float32)
            for kk in range(k):
                ex = int(idx[src, tok, kk])
                if 0 <= ex < e:
                    o, j, row = where[(src, tok, ex)]
                    acc += np.float32(w[src, tok, kk]) * y[o, j, row].astype(np.float32)
            out[src, tok] = acc
    return out.astype(ml_dtypes.bfloat16)
