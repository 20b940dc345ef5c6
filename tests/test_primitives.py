"""The primitives on CPU: abstract eval, jit/shard_map/vmap, identity, stats, order token."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl.testing import parameterized
from jax.sharding import PartitionSpec as P

import jax_mscclpp_ep as ep
from jax_mscclpp_ep import reference

import _ep_util as u


def _identity_run(r, t, h, k, e, m, use_fp8, round_scale=False):
    rng, seed = u.fresh_rng()
    x, idx, w = u.make_inputs(rng, r, t, h, k, e)
    config = ep.EPConfig(e, m, h)

    def fn(xs, ids, ws):
        res = ep.dispatch(xs, ids, config, use_fp8=use_fp8, round_scale=round_scale)
        y = res.recv_x
        if use_fp8:
            y = ep.dequantize(res.recv_x, res.recv_scales).astype(jnp.bfloat16)
        return ep.combine(y, ids, ws, res.handle, config)

    out = u.shard_run(r, fn, x, idx, w).astype(np.float32)
    wsum = np.where(idx >= 0, w, 0).sum(-1, keepdims=True)
    return out, x.astype(np.float32), wsum, seed


class Identity(parameterized.TestCase):

    @parameterized.product(r=[1, 2, 4, 8], use_fp8=[False, True])
    def test_combine_of_dispatch(self, r, use_fp8):
        out, x, wsum, seed = _identity_run(r, 7, 256, 4, 16, 8, use_fp8)
        want = x * wsum
        # bf16 output rounding (2^-8 relative) on every path; fp8 adds e4m3 rounding of
        # each 128-block (2^-4 of the block amax) per slot, and y's bf16 rounding.
        if use_fp8:
            amax = np.abs(x.reshape(*x.shape[:2], -1, 128)).max(-1, keepdims=True)
            tol = (amax * 2.0 ** -4 * wsum[..., None] + np.abs(want.reshape(amax.shape[:-1] + (128,)))
                   * 2.0 ** -7).reshape(x.shape)
        else:
            tol = np.abs(want) * 2.0 ** -7 + 1e-6
        assert np.all(np.abs(out - want) <= tol + 1e-6), f"seed {seed}"

    def test_round_scale_identity(self):
        out, x, wsum, seed = _identity_run(2, 5, 128, 2, 4, 5, True, round_scale=True)
        amax = np.abs(x).max(-1, keepdims=True)
        assert np.all(np.abs(out - x * wsum) <= amax * 2.0 ** -3 * wsum + 1e-6), f"seed {seed}"


class Tracing(parameterized.TestCase):

    def test_abstract_eval_shapes(self):
        config = ep.EPConfig(num_experts=16, max_tokens_per_rank=8, hidden=256)
        mesh = u.mesh_of(4)

        def fn(x, idx, w):
            res = ep.dispatch(x[0], idx[0], config, use_fp8=True, stats=jnp.zeros((4,), jnp.int32))
            y = ep.dequantize(res.recv_x, res.recv_scales).astype(jnp.bfloat16)
            out = ep.combine(y, idx[0], w[0], res.handle, config)
            return res.recv_x[None], res.recv_scales[None], res.recv_count[None], out[None], \
                res.stats[None]

        f = jax.shard_map(fn, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))
        shapes = jax.eval_shape(f, jax.ShapeDtypeStruct((4, 5, 256), jnp.bfloat16),
                                jax.ShapeDtypeStruct((4, 5, 3), jnp.int32),
                                jax.ShapeDtypeStruct((4, 5, 3), jnp.float32))
        assert shapes[0].shape == (4, 4, 32, 256) and shapes[0].dtype == jnp.float8_e4m3fn
        assert shapes[1].shape == (4, 4, 32, 2) and shapes[1].dtype == jnp.float32
        assert shapes[2].shape == (4, 4) and shapes[2].dtype == jnp.int32
        assert shapes[3].shape == (4, 5, 256) and shapes[3].dtype == jnp.bfloat16
        assert shapes[4].shape == (4, 4)

    def test_single_rank_without_axis_eager_and_jit(self):
        rng, _ = u.fresh_rng()
        x, idx, w = u.make_inputs(rng, 1, 6, 128, 2, 4)
        config = ep.EPConfig(4, 6, 128)

        def fn(xs, ids, ws):
            res = ep.dispatch(xs, ids, config, axis_name=None)
            return ep.combine(res.recv_x, ids, ws, res.handle, config, axis_name=None)

        eager = np.asarray(fn(x[0], idx[0], w[0])).astype(np.float32)
        jitted = np.asarray(jax.jit(fn)(x[0], idx[0], w[0])).astype(np.float32)
        np.testing.assert_array_equal(eager, jitted)
        want = x[0].astype(np.float32) * np.where(idx[0] >= 0, w[0], 0).sum(-1, keepdims=True)
        np.testing.assert_allclose(eager, want, rtol=2 ** -7, atol=1e-6)

    def test_stats_accumulate(self):
        rng, _ = u.fresh_rng()
        r, e = 4, 8
        x, idx, _ = u.make_inputs(rng, r, 6, 128, 3, e)
        config = ep.EPConfig(e, 6, 128)
        start = rng.integers(0, 100, (r, e // r)).astype(np.int32)

        def fn(xs, ids, st):
            res = ep.dispatch(xs, ids, config, stats=st)
            res2 = ep.dispatch(xs, ids, config, stats=res.stats, after=res)
            return res.recv_count, res2.stats

        count, stats = u.shard_run(r, fn, x, idx, start)
        np.testing.assert_array_equal(stats, start + 2 * count)
        assert count.sum() == np.sum(idx >= 0)

    def test_vmap_over_microbatches(self):
        rng, seed = u.fresh_rng()
        r, b, t, h, k, e, m = 2, 3, 5, 128, 2, 8, 5
        xs, idxs, ws = zip(*[u.make_inputs(rng, r, t, h, k, e) for _ in range(b)])
        x, idx, w = (np.stack(a, axis=1) for a in (xs, idxs, ws))   # [R, B, ...]
        config = ep.EPConfig(e, m, h)

        def one(xv, iv, wv):
            res = ep.dispatch(xv, iv, config)
            out = ep.combine(res.recv_x, iv, wv, res.handle, config)
            return res.recv_x, res.recv_count, out

        batched = u.shard_run(r, jax.vmap(one), x, idx, w)
        for i in range(b):
            single = u.shard_run(r, one, x[:, i], idx[:, i], w[:, i])
            for got, want in zip(batched, single):
                np.testing.assert_array_equal(np.asarray(got[:, i]).astype(np.float32),
                                              np.asarray(want).astype(np.float32),
                                              f"micro-batch {i}, seed {seed}")

    def test_vmap_with_unbatched_indices(self):
        rng, _ = u.fresh_rng()
        r, b, e = 2, 2, 4
        x, idx, _ = u.make_inputs(rng, r, 4, 128, 2, e)
        xb = np.stack([x, (x.astype(np.float32) * 2).astype(ml_dtypes.bfloat16)], axis=1)
        config = ep.EPConfig(e, 4, 128)
        recv = u.shard_run(r, lambda xv, iv: jax.vmap(
            lambda a: ep.dispatch(a, iv, config).recv_x)(xv), xb, idx)
        np.testing.assert_array_equal(recv[:, 1].astype(np.float32), 2 * recv[:, 0].astype(np.float32))

    def test_order_token_chains_calls(self):
        config = ep.EPConfig(4, 4, 128)
        x = jnp.asarray(np.random.default_rng().standard_normal((4, 128)), jnp.bfloat16)
        idx = jnp.asarray([[0, 1], [2, -1], [3, 0], [1, 2]], jnp.int32)

        def fn(x):
            a = ep.dispatch(x, idx, config, axis_name=None)
            b = ep.dispatch(x, idx, config, axis_name=None, after=a)
            out, order = ep.combine(b.recv_x, idx, jnp.ones((4, 2), jnp.float32), b.handle, config,
                                    axis_name=None, return_order=True)
            return out, order

        jaxpr = jax.make_jaxpr(fn)(x)
        eqns = [e for e in jaxpr.eqns if e.primitive in (ep.dispatch_p, ep.combine_p)]
        assert len(eqns) == 3
        assert eqns[1].invars[3] is eqns[0].outvars[6]   # second dispatch follows the first
        assert eqns[2].invars[5] is eqns[1].outvars[6]   # combine follows the second
        out, order = jax.jit(fn)(x)
        assert order.shape == () and order.dtype == jnp.int32

    def test_scan_many_steps(self):
        rng, _ = u.fresh_rng()
        r, e, m, h = 2, 4, 4, 128
        x, idx, w = u.make_inputs(rng, r, m, h, 2, e, mask_frac=0.0)
        w = w / w.sum(-1, keepdims=True)
        config = ep.EPConfig(e, m, h)

        def fn(xs, ids, ws):
            def step(carry, _):
                res = ep.dispatch(carry, ids, config)
                return ep.combine(res.recv_x, ids, ws, res.handle, config), None
            return jax.lax.scan(step, xs, None, length=20)[0]

        out = u.shard_run(r, fn, x, idx, w).astype(np.float32)
        np.testing.assert_allclose(out, x.astype(np.float32), rtol=2 ** -4, atol=1e-2)
