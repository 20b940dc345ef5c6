"""One Buffer for a whole model: three MoE layers exchange tokens on the same Buffer
(as a Python loop and inside lax.scan over stacked layer params); output and gradients
equal the dense model's.

K = E: every token visits every expert, so no top-k choice hinges on a near tie. With
K < E a bf16 rounding difference in one layer's output may flip a later layer's
choice, and the two models part ways for that token (a test of chaos, not of EP).
"""

import jax
import jax.numpy as jnp
import pytest

import jax_mscclpp_ep as ep

import _ep_util as u
import _layers

R, L, H, F, E, K, N = 4, 3, 128, 64, 8, 8, 32


def check_shared_buffer(mesh, buf, layers, x, c, seed, *, scan):
    kw = dict(top_k=K)
    f_ep = _layers.ep_model(mesh, buf, scan=scan, **kw)
    arg = _layers.stack(layers) if scan else layers
    out_ep = jax.jit(f_ep)(arg, x)
    out_d = jax.jit(lambda p, xx: _layers.dense_model(p, xx, **kw))(layers, x)
    # bf16 roundings at different points of the two programs, over three layers
    assert u.rel_err(out_ep, out_d) < 3e-2, f"seed {seed}: output rel err {u.rel_err(out_ep, out_d)}"
    assert u.norm_rel_err(out_ep, out_d) < 1e-2, f"seed {seed}: {u.norm_rel_err(out_ep, out_d)}"
    g_ep = jax.jit(jax.grad(lambda p, xx: jnp.sum(c * f_ep(p, xx).astype(jnp.float32)),
                            argnums=(0, 1)))(arg, x)
    g_d = jax.jit(jax.grad(lambda p, xx: jnp.sum(c * _layers.dense_model(p, xx, **kw)
                                                  .astype(jnp.float32)), argnums=(0, 1)))(layers, x)
    if scan:
        g_d = (_layers.stack(g_d[0]), g_d[1])
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_ep), jax.tree.leaves(g_d)):
        name = jax.tree_util.keystr(path)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert u.norm_rel_err(a, b) < 2e-2, f"seed {seed}: grad {name} norm rel err {u.norm_rel_err(a, b)}"


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_layers_share_one_buffer(scan):
    rng, seed = u.fresh_rng()
    layers = _layers.init_layers(jax.random.key(int(rng.integers(1 << 31))), L, H, F, E)
    x = jnp.asarray(rng.standard_normal((N, H)), jnp.bfloat16)
    c = jnp.asarray(rng.standard_normal((N, H)), jnp.float32)
    mesh = u.mesh_of(R)
    with ep.Buffer(ep.EPConfig(E, N // R, H), mesh=mesh) as buf:
        check_shared_buffer(mesh, buf, layers, x, c, seed, scan=scan)
