"""Gradients through dispatch/combine on CPU: finite differences, a dense MoE, fp8, remat."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl.testing import parameterized
from jax.sharding import PartitionSpec as P

import jax_mscclpp_ep as ep

import _ep_util as u

T, H, K, E, M = 6, 128, 3, 8, 8
CONFIG = ep.EPConfig(E, M, H)


def _inputs(r, dup=True):
    rng, seed = u.fresh_rng()
    x, idx, w = u.make_inputs(rng, r, T, H, K, E)
    if dup:  # a token naming one expert twice: one message, both weights in combine
        idx[:, 0, 1] = idx[:, 0, 0] = np.abs(idx[:, 0, 0])
    return rng, seed, x, idx, w


def _total(r, fn):
    """sum over ranks of fn(per-rank args) -> scalar, as a function of the stacked args."""
    def body(*a):
        return fn(*[v[0] for v in a])[None]

    f = jax.shard_map(body, mesh=u.mesh_of(r), in_specs=P("ep"), out_specs=P("ep"))
    return lambda *a: jnp.sum(f(*a))


def _by_rank(w1, r):
    """[E, ...] expert weights -> [R, LE, ...]: rank i holds experts i*LE .. (i+1)*LE - 1."""
    return w1.reshape((r, w1.shape[0] // r) + w1.shape[1:])


def _bf16(a):
    return np.asarray(a).astype(ml_dtypes.bfloat16)


def _f32(a):
    return np.asarray(a).astype(np.float32)


def _rel(got, want):
    got, want = _f32(got), _f32(want)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def _ffn(rows, w1):
    """A nonlinear per-expert map on bf16 rows [G, N, H] with weights [G, H, H]."""
    hid = jnp.einsum("gnh,ghf->gnf", rows, w1.astype(jnp.bfloat16),
                     preferred_element_type=jnp.float32)
    return jnp.tanh(hid).astype(jnp.bfloat16)


def _ep_loss(xs, ids, ws, w1, c):
    res = ep.dispatch(xs, ids, CONFIG)
    out = ep.combine(_ffn(res.recv_x, w1), ids, ws, res.handle, CONFIG)
    return jnp.sum(c * out.astype(jnp.float32))


def _dense_loss(x, idx, w, w1, c):
    """Same model without expert parallelism: every token through its experts, densely."""
    r = x.shape[0]
    xf = x.reshape(r * T, H)
    every = _ffn(jnp.broadcast_to(xf[None], (E, r * T, H)), w1)           # [E, N, H]
    ids = idx.reshape(r * T, K)
    ok = ids >= 0
    rows = every[jnp.where(ok, ids, 0), jnp.arange(r * T)[:, None]]       # [N, K, H]
    wk = jnp.where(ok, w.reshape(r * T, K), 0.0)
    out = jnp.sum(rows.astype(jnp.float32) * wk[..., None], axis=1).astype(jnp.bfloat16)
    return jnp.sum(c.reshape(r * T, H) * out.astype(jnp.float32))


class FiniteDifferences(parameterized.TestCase):
    """The exchanges are linear in x, y and w: a central difference is exact up to rounding."""

    @parameterized.parameters(1, 2, 4)
    def test_dispatch_x(self, r):
        rng, seed, x, idx, _ = _inputs(r)
        c = rng.standard_normal((r, E // r, r * M, H)).astype(np.float32)
        loss = _total(r, lambda xs, ids, cs: jnp.sum(
            cs * ep.dispatch(xs, ids, CONFIG).recv_x.astype(jnp.float32)))
        g = jax.jit(jax.grad(loss))(x, idx, c)
        v = rng.standard_normal(x.shape).astype(np.float32)
        xp, xm = _bf16(_f32(x) + 0.5 * v), _bf16(_f32(x) - 0.5 * v)
        lf = jax.jit(loss)
        fd = float(lf(xp, idx, c)) - float(lf(xm, idx, c))
        lin = float(np.sum(_f32(g) * (_f32(xp) - _f32(xm))))
        # recv_x copies x exactly; the gradient is bf16 (x's dtype): 2^-9 relative per element
        tol = 2.0 ** -8 * float(np.sum(np.abs(_f32(g) * (_f32(xp) - _f32(xm))))) + 1e-3
        assert abs(fd - lin) <= tol, f"seed {seed}: {fd} vs {lin}"

    @parameterized.parameters(1, 2, 4)
    def test_combine_y_and_weights(self, r):
        rng, seed, x, idx, w = _inputs(r)
        c = rng.standard_normal((r, T, H)).astype(np.float32)

        def per_rank(xs, ids, ws, ys, cs, absolute=False):
            h = ep.dispatch(xs, ids, CONFIG).handle
            out = ep.combine(ys, ids, ws, h, CONFIG).astype(jnp.float32)
            return jnp.sum(jnp.abs(cs * out)) if absolute else jnp.sum(cs * out)

        y = _bf16(rng.standard_normal((r, E // r, r * M, H)))
        loss = _total(r, per_rank)
        lf = jax.jit(loss)
        lab = jax.jit(_total(r, functools.partial(per_rank, absolute=True)))
        gw, gy = jax.jit(jax.grad(loss, argnums=(2, 3)))(x, idx, w, y, c)

        def check(what, a, b, lin, g_rounding):
            # out is rounded to bf16 once (2^-9 relative) in each of the two evaluations
            fd = float(lf(*a)) - float(lf(*b))
            tol = 2.0 ** -8 * (float(lab(*a)) + float(lab(*b))) + g_rounding + 1e-3
            assert abs(fd - lin) <= tol, f"seed {seed}: d{what} {fd} vs {lin} (tol {tol})"

        v = rng.standard_normal(w.shape).astype(np.float32)   # f32: the step is exact
        check("w", (x, idx, w + v, y, c), (x, idx, w - v, y, c), float(np.sum(_f32(gw) * 2 * v)), 0.0)
        assert np.all(_f32(gw)[idx < 0] == 0), f"seed {seed}"
        vy = rng.standard_normal(y.shape).astype(np.float32)
        yp, ym = _bf16(_f32(y) + vy), _bf16(_f32(y) - vy)
        dy = _f32(yp) - _f32(ym)
        check("y", (x, idx, w, yp, c), (x, idx, w, ym, c), float(np.sum(_f32(gy) * dy)),
              2.0 ** -8 * float(np.sum(np.abs(_f32(gy) * dy))))


class DenseMoE(parameterized.TestCase):

    @parameterized.parameters(1, 2, 4)
    def test_grads_match_dense(self, r):
        rng, seed, x, idx, w = _inputs(r)
        w1 = (rng.standard_normal((E, H, H)) / np.sqrt(H)).astype(np.float32)
        c = rng.standard_normal((r, T, H)).astype(np.float32)
        ep_val, ep_g = jax.jit(jax.value_and_grad(_total(r, _ep_loss), argnums=(0, 2, 3)))(
            x, idx, w, _by_rank(w1, r), c)
        d_val, d_g = jax.jit(jax.value_and_grad(_dense_loss, argnums=(0, 2, 3)))(x, idx, w, w1, c)
        ep_g = (ep_g[0], ep_g[1], ep_g[2].reshape(w1.shape))
        assert abs(float(ep_val) - float(d_val)) <= 1e-2 * abs(float(d_val)) + 1e-2, f"seed {seed}"
        for name, a, b in zip(("x", "w", "w1"), ep_g, d_g):
            assert a.dtype == b.dtype, name
            assert _rel(a, b) < 3e-2, f"seed {seed}: d{name} rel err {_rel(a, b)}"

    def test_checkpoint_and_value_and_grad(self):
        r = 2
        rng, seed, x, idx, w = _inputs(r)
        w1 = _by_rank((rng.standard_normal((E, H, H)) / np.sqrt(H)).astype(np.float32), r)
        c = rng.standard_normal((r, T, H)).astype(np.float32)
        plain = _total(r, _ep_loss)
        remat = _total(r, jax.checkpoint(_ep_loss))
        v0, g0 = jax.jit(jax.value_and_grad(plain, argnums=(0, 2, 3)))(x, idx, w, w1, c)
        v1, g1 = jax.jit(jax.value_and_grad(remat, argnums=(0, 2, 3)))(x, idx, w, w1, c)
        assert float(v0) == float(jax.jit(plain)(x, idx, w, w1, c)), f"seed {seed}"
        assert float(v0) == float(v1), f"seed {seed}"
        for a, b in zip(g0, g1):
            np.testing.assert_array_equal(_f32(a), _f32(b), f"seed {seed}")

    def test_integer_inputs_get_float0(self):
        r = 2
        rng, seed, x, idx, w = _inputs(r)
        w1 = _by_rank((rng.standard_normal((E, H, H)) / np.sqrt(H)).astype(np.float32), r)
        c = rng.standard_normal((r, T, H)).astype(np.float32)
        g = jax.grad(_total(r, _ep_loss), argnums=1, allow_int=True)(x, idx, w, w1, c)
        assert g.dtype == jax.dtypes.float0

    def test_jvp_matches_vjp(self):
        r = 2
        rng, seed, x, idx, w = _inputs(r)
        w1 = _by_rank((rng.standard_normal((E, H, H)) / np.sqrt(H)).astype(np.float32), r)
        c = rng.standard_normal((r, T, H)).astype(np.float32)

        def out_fn(ww):
            def per_rank(xs, ids, wr, w1s):
                res = ep.dispatch(xs, ids, CONFIG)
                return ep.combine(_ffn(res.recv_x, w1s), ids, wr, res.handle, CONFIG)[None]
            return jax.shard_map(lambda *a: per_rank(*[v[0] for v in a]), mesh=u.mesh_of(r),
                                 in_specs=P("ep"), out_specs=P("ep"))(x, idx, ww, w1)

        tw = rng.standard_normal(w.shape).astype(np.float32)
        _, t_out = jax.jit(lambda a, t: jax.jvp(out_fn, (a,), (t,)))(w, tw)
        jv = np.sum(c * _f32(t_out))
        gw = jax.jit(jax.grad(lambda ww: jnp.sum(c * out_fn(ww).astype(jnp.float32))))(w)
        lin = float(np.sum(_f32(gw) * tw))
        tol = 2.0 ** -8 * float(np.sum(np.abs(c * _f32(t_out)))) + 1e-3   # bf16 tangent
        assert abs(float(jv) - lin) <= tol, f"seed {seed}: {jv} vs {lin}"


class Fp8(parameterized.TestCase):
    """fp8: the cast is identity in the backward pass (straight-through)."""

    @parameterized.parameters(1, 2)
    def test_dequantized_grad_is_bf16_grad_of_dequantized_value(self, r):
        rng, seed, x, idx, _ = _inputs(r)
        c = rng.standard_normal((r, E // r, r * M, H)).astype(np.float32)
        q, s = jax.vmap(ep.fp8_cast)(jnp.asarray(x))
        x_deq = _bf16(jax.vmap(ep.dequantize)(q, s))

        def loss_fp8(xs, ids, cs):
            v = ep.dispatch(xs, ids, CONFIG, use_fp8=True, dequantize=True).recv_x
            return jnp.sum(cs * jnp.square(v.astype(jnp.float32)))

        def loss_bf16(xs, ids, cs):
            v = ep.dispatch(xs, ids, CONFIG).recv_x
            return jnp.sum(cs * jnp.square(v.astype(jnp.float32)))

        v8, g8 = jax.jit(jax.value_and_grad(_total(r, loss_fp8)))(x, idx, c)
        vb, gb = jax.jit(jax.value_and_grad(_total(r, loss_bf16)))(x_deq, idx, c)
        np.testing.assert_allclose(float(v8), float(vb), rtol=1e-5, err_msg=f"seed {seed}")
        np.testing.assert_allclose(_f32(g8), _f32(gb), rtol=1e-2, atol=1e-2 * np.abs(_f32(gb)).max(),
                                   err_msg=f"seed {seed}")

    def test_raw_fp8_grad_is_straight_through(self):
        r = 2
        rng, seed, x, idx, _ = _inputs(r)
        c = rng.standard_normal((r, E // r, r * M, H)).astype(np.float32)

        def loss(xs, ids, cs, fp8):
            res = ep.dispatch(xs, ids, CONFIG, use_fp8=fp8)
            v = ep.dequantize(res.recv_x, res.recv_scales) if fp8 else res.recv_x.astype(jnp.float32)
            return jnp.sum(cs * v)

        g8 = jax.jit(jax.grad(_total(r, functools.partial(loss, fp8=True))))(x, idx, c)
        gb = jax.jit(jax.grad(_total(r, functools.partial(loss, fp8=False))))(x, idx, c)
        # the cotangent of q passed through e4m3 (scaled by the small scale, so partly
        # subnormal): close, not equal; dispatch(dequantize=True) is the exact form
        a, b = _f32(g8).ravel(), _f32(gb).ravel()
        assert np.corrcoef(a, b)[0, 1] > 0.97 and _rel(g8, gb) < 0.5, f"seed {seed}"


class Vmap(parameterized.TestCase):

    def test_grad_under_vmap(self):
        r = 2
        rng, seed, x, idx, w = _inputs(r)
        w1 = _by_rank((rng.standard_normal((E, H, H)) / np.sqrt(H)).astype(np.float32), r)
        c = rng.standard_normal((r, T, H)).astype(np.float32)
        ws = np.stack([w, 2 * w], axis=1)                     # [R, 2, T, K]

        def per_rank(xs, ids, wb, w1s, cs):
            return jax.vmap(jax.grad(lambda ww: _ep_loss(xs, ids, ww, w1s, cs)))(wb)

        def body(*a):
            return per_rank(*[v[0] for v in a])[None]

        f = jax.jit(jax.shard_map(body, mesh=u.mesh_of(r), in_specs=P("ep"), out_specs=P("ep")))
        g = np.asarray(f(x, idx, ws, w1, c))
        # the loss is linear in w: both batch elements have the same gradient
        np.testing.assert_allclose(g[:, 0], g[:, 1], rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}")


class AnyHandle(parameterized.TestCase):
    """The backward exchanges find rows through the handle: any row order inside a block works."""

    def test_reversed_blocks(self):
        from jax_mscclpp_ep import reference_bwd
        r = 2
        rng, seed, x, idx, w = _inputs(r)
        g = _bf16(rng.standard_normal((r, T, H)))

        def per_rank(xs, ids, ws, gs):
            res = ep.dispatch(xs, ids, CONFIG)
            src, lr = res.handle.src_info, res.handle.layout_range
            off, cnt = ep.unpack_layout(lr)                         # [LE, R]
            rows = jnp.arange(src.shape[1])
            # new position of each row: reversed inside its (expert, source rank) block
            inside = (rows[None, None] >= off[..., None]) & (rows[None, None] < (off + cnt)[..., None])
            o = jnp.sum(jnp.where(inside, off[..., None], 0), 1)
            c = jnp.sum(jnp.where(inside, cnt[..., None], 0), 1)
            valid = jnp.any(inside, 1)
            new = jnp.where(valid, 2 * o + c - 1 - rows[None], rows[None])   # [LE, rows]
            le = src.shape[0]
            j = jnp.arange(le)[:, None]
            src2 = jnp.zeros_like(src).at[j, new].set(src)
            kw = dict(num_experts=E, max_tokens=M, axis_name="ep")
            gy = reference_bwd.scatter_to_rows(gs, ids, ws, src, lr, **kw)
            gy2 = reference_bwd.scatter_to_rows(gs, ids, ws, src2, lr, **kw)
            y = res.recv_x
            y2 = jnp.zeros_like(y).at[j, new].set(y)
            back = reference_bwd.gather_rows(y, ids, src, lr, **kw)
            back2 = reference_bwd.gather_rows(y2, ids, src2, lr, **kw)
            return gy2, jnp.zeros_like(gy).at[j, new].set(gy), back, back2

        gy2, gy_moved, back, back2 = u.shard_run(r, per_rank, x, idx, w, g)
        np.testing.assert_array_equal(_f32(gy2), _f32(gy_moved), f"seed {seed}")
        np.testing.assert_array_equal(_f32(back), _f32(back2), f"seed {seed}")
        # gather_rows brings back x itself for every slot that names an expert
        ok = idx >= 0
        want = np.where(ok[..., None], _f32(x)[:, :, None, :], 0)
        np.testing.assert_array_equal(_f32(back), want, f"seed {seed}")
