"""The MoE layer: expert-parallel result and gradients equal the dense computation."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from jax.sharding import Mesh

import jax_mscclpp_ep as ep
from jax_mscclpp_ep import moe

import _ep_util as u

H, F, E, K = 128, 64, 8, 2


def _case(n):
    rng, seed = u.fresh_rng()
    params = moe.init_params(jax.random.key(int(rng.integers(1 << 31))), H, F, E, scale=2.0)
    x = jnp.asarray(rng.standard_normal((n, H)) * rng.uniform(0.5, 2.0), jnp.bfloat16)
    c = jnp.asarray(rng.standard_normal((n, H)), jnp.float32)
    return params, x, c, seed


def _check(mesh, dp_axis, n, score="softmax", use_fp8=False):
    params, x, c, seed = _case(n)
    shards = mesh.size
    config = ep.EPConfig(E, n // shards, H)
    kw = dict(top_k=K, score=score, use_fp8=use_fp8)
    f_ep = moe.sharded_moe(mesh, config, dp_axis=dp_axis, **kw)
    loss_ep = lambda p, xx: jnp.sum(c * f_ep(p, xx).astype(jnp.float32))
    loss_dense = lambda p, xx: jnp.sum(c * moe.moe_dense(p, xx, **kw).astype(jnp.float32))
    out_ep = jax.jit(f_ep)(params, x)
    out_d = jax.jit(lambda p, xx: moe.moe_dense(p, xx, **kw))(params, x)
    assert u.rel_err(out_ep, out_d) < 1e-2, f"seed {seed}: output rel err {u.rel_err(out_ep, out_d)}"
    g_ep = jax.jit(jax.grad(loss_ep, argnums=(0, 1)))(params, x)
    g_d = jax.jit(jax.grad(loss_dense, argnums=(0, 1)))(params, x)
    for path, a in jax.tree_util.tree_leaves_with_path(g_ep):
        b = g_d
        for key in path:
            b = b[key.idx] if hasattr(key, "idx") else b[key.key]
        assert a.shape == b.shape and a.dtype == b.dtype, path
        # bf16 gradients rounded at different points of the two programs: close in norm
        name = jax.tree_util.keystr(path)
        assert u.rel_err(a, b) < 8e-2, f"seed {seed}: grad {name} max rel err {u.rel_err(a, b)}"
        assert u.norm_rel_err(a, b) < 2e-2, f"seed {seed}: grad {name} norm rel err {u.norm_rel_err(a, b)}"


class MoELayer(parameterized.TestCase):

    @parameterized.parameters((1, "softmax"), (4, "softmax"), (4, "sigmoid"))
    def test_ep_equals_dense(self, r, score):
        mesh = Mesh(np.array(jax.devices("cpu")[:r]), ("ep",))
        _check(mesh, None, 8 * r, score)

    def test_dp_by_ep_mesh(self):
        mesh = Mesh(np.array(jax.devices("cpu")[:8]).reshape(2, 4), ("dp", "ep"))
        _check(mesh, "dp", 48)

    def test_fp8_dispatch(self):
        mesh = Mesh(np.array(jax.devices("cpu")[:2]), ("ep",))
        _check(mesh, None, 16, use_fp8=True)

    def test_rows_past_count_do_not_leak(self):
        rows = jnp.full((2, 4, H), jnp.nan, jnp.bfloat16).at[:, :2].set(1.0)
        p = moe.init_params(jax.random.key(0), H, F, 2)
        out = moe.expert_ffn(rows, p["w_in"], p["w_out"], jnp.asarray([2, 1], jnp.int32))
        assert np.isfinite(np.asarray(out, np.float32)).all()
        assert np.all(np.asarray(out[1, 1:], np.float32) == 0)


def test_ragged_ffn_with_zero_capacity_gives_zeros():
    """capacity 0 (every count 0: a step where no expert here received a row): zeros, and
    zero gradients, not an empty gather."""
    rng, seed = u.fresh_rng()
    p = moe.init_params(jax.random.key(int(rng.integers(1 << 31))), H, F, 3)
    rows = jnp.asarray(rng.standard_normal((3, 8, H)), jnp.bfloat16)
    counts = jnp.zeros((3,), jnp.int32)
    out = jax.jit(lambda r, wi, wo: moe.expert_ffn_ragged(r, wi, wo, counts, 0))(
        rows, p["w_in"], p["w_out"])
    assert out.shape == rows.shape and not np.asarray(out, np.float32).any(), f"seed {seed}"
    gw = jax.grad(lambda wi: jnp.sum(moe.expert_ffn_ragged(rows, wi, p["w_out"], counts, 0)
                                     .astype(jnp.float32)))(p["w_in"])
    assert not np.asarray(gw).any(), f"seed {seed}"


class FFNVariants(parameterized.TestCase):
    """ffn="bucketed" and "ragged" equal the masked batched matmul, values and gradients."""

    @parameterized.product(kind=["bucketed", "ragged"], shape=[(4, 64, 0), (3, 16, 0), (5, 32, 2)])
    def test_equals_masked(self, kind, shape):
        g, n, k_full = shape
        rng, seed = u.fresh_rng()
        p = moe.init_params(jax.random.key(int(rng.integers(1 << 31))), H, F, g, scale=2.0)
        rows = jnp.asarray(rng.standard_normal((g, n, H)) * 2, jnp.bfloat16)
        # the fullest group anywhere from empty to full: every bucket gets picked
        top = int(rng.integers(0, n + 1))
        counts = rng.integers(0, top + 1, size=g)
        counts[rng.integers(g)] = top
        counts[:k_full] = n           # some groups full, the layout's worst case
        counts = jnp.asarray(counts, jnp.int32)
        c = jnp.asarray(rng.standard_normal((g, n, H)), jnp.float32)
        cap = int(counts.sum()) + int(rng.integers(0, 3))
        valid = (jnp.arange(n)[None, :] < counts[:, None])[..., None]
        # NaN garbage past the counts must not leak (dispatch leaves those rows unspecified)
        rows_nan = jnp.where(valid, rows, jnp.nan)

        def loss(fn, r, wi, wo):
            return jnp.sum(c * fn(r, wi, wo).astype(jnp.float32))
        masked = lambda r, wi, wo: moe.expert_ffn(r, wi, wo, counts)
        if kind == "ragged":
            other = lambda r, wi, wo: moe.expert_ffn_ragged(r, wi, wo, counts, cap)
        else:
            other = lambda r, wi, wo: moe.expert_ffn_bucketed(r, wi, wo, counts)
        a = jax.jit(other)(rows_nan, p["w_in"], p["w_out"])
        b = jax.jit(masked)(rows, p["w_in"], p["w_out"])
        msg = f"seed {seed}, counts {np.asarray(counts)}"
        assert np.isfinite(np.asarray(a, np.float32)).all(), msg
        assert u.rel_err(a, b) < 1e-2, f"{msg}: {u.rel_err(a, b)}"
        assert np.all(np.asarray(jnp.where(valid, 0, a), np.float32) == 0), msg
        ga = jax.jit(jax.grad(lambda *v: loss(other, *v), argnums=(0, 1, 2)))(
            rows_nan, p["w_in"], p["w_out"])
        gb = jax.jit(jax.grad(lambda *v: loss(masked, *v), argnums=(0, 1, 2)))(
            rows, p["w_in"], p["w_out"])
        for name, x, y in zip(("rows", "w_in", "w_out"), ga, gb):
            assert np.isfinite(np.asarray(x, np.float32)).all(), f"{msg}: {name}"
            assert u.norm_rel_err(x, y) < 2e-2, f"{msg}: {name} {u.norm_rel_err(x, y)}"

    def test_bucket_sizes(self):
        self.assertEqual(moe.bucket_sizes(256), (16, 32, 64, 128, 256))
        self.assertEqual(moe.bucket_sizes(20), (8, 16, 20))
        self.assertEqual(moe.bucket_sizes(64, [5, 30, 100]), (8, 32, 64))

    @parameterized.product(r=[1, 4], ffn=["bucketed", "masked", "ragged"])
    def test_layer_equals_dense(self, r, ffn):
        mesh = Mesh(np.array(jax.devices("cpu")[:r]), ("ep",))
        params, x, c, seed = _case(8 * r)
        config = ep.EPConfig(E, 8, H)
        f_ep = moe.sharded_moe(mesh, config, top_k=K, ffn=ffn)
        loss = lambda p, f: jnp.sum(c * f(p, x).astype(jnp.float32))
        dense = lambda p, xx: moe.moe_dense(p, xx, top_k=K)
        out_d = jax.jit(dense)(params, x)
        out_e = jax.jit(f_ep)(params, x)
        assert u.rel_err(out_e, out_d) < 1e-2, f"seed {seed}: {u.rel_err(out_e, out_d)}"
        g_e = jax.jit(jax.grad(lambda p: loss(p, f_ep)))(params)
        g_d = jax.jit(jax.grad(lambda p: loss(p, dense)))(params)
        for key in ("router", "w_in", "w_out"):
            assert u.norm_rel_err(g_e[key], g_d[key]) < 2e-2, f"seed {seed}: {key}"

    def test_bad_ffn_name(self):
        mesh = Mesh(np.array(jax.devices("cpu")[:1]), ("ep",))
        params, x, _, _ = _case(8)
        with self.assertRaisesRegex(ValueError, "ffn must be one of"):
            jax.jit(moe.sharded_moe(mesh, ep.EPConfig(E, 8, H), top_k=K, ffn="dense"))(params, x)
