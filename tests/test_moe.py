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
