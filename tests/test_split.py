"""Split dispatch/combine (send half, receive half) on CPU: identical to the whole
calls (values and gradients), two micro-batches interleaved on two buffers, vmap, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import jax_mscclpp_ep as ep

import _ep_util as u

T, H, K, E = 12, 256, 3, 8


def _whole(config, use_fp8, r):
    def fn(x, idx, w):
        res = ep.dispatch(x, idx, config, use_fp8=use_fp8, stats=jnp.zeros((E // r,), jnp.int32))
        y = (ep.dequantize(res.recv_x, res.recv_scales) if use_fp8 else res.recv_x).astype(jnp.bfloat16)
        out = ep.combine(y, idx, w, res.handle, config)
        return res.recv_x, res.recv_count, res.handle.src_info, res.stats, out
    return fn


def _split(config, use_fp8, r):
    def fn(x, idx, w):
        pend = ep.dispatch_send(x, idx, config, use_fp8=use_fp8,
                                stats=jnp.zeros((E // r,), jnp.int32))
        busy = jnp.sum(jnp.tanh(x.astype(jnp.float32)))  # work between the halves
        res = ep.dispatch_recv(pend)
        y = (ep.dequantize(res.recv_x, res.recv_scales) if use_fp8 else res.recv_x).astype(jnp.bfloat16)
        pc = ep.combine_send(y, idx, w, res.handle, config)
        out = ep.combine_recv(pc) + (busy * 0).astype(jnp.bfloat16)
        return res.recv_x, res.recv_count, res.handle.src_info, res.stats, out
    return fn


class SplitHalves(parameterized.TestCase):

    @parameterized.product(r=[1, 2, 4], use_fp8=[False, True])
    def test_equals_whole_calls(self, r, use_fp8):
        rng, seed = u.fresh_rng()
        x, idx, w = u.make_inputs(rng, r, T, H, K, E)
        config = ep.EPConfig(E, T, H)
        want = u.shard_run(r, _whole(config, use_fp8, r), x, idx, w)
        got = u.shard_run(r, _split(config, use_fp8, r), x, idx, w)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8),
                                          f"seed {seed}")

    def test_two_micro_batches_interleaved(self):
        """Batch A's exchange brackets batch B's and vice versa, on two buffers."""
        r = 4
        rng, seed = u.fresh_rng()
        xa, ia, wa = u.make_inputs(rng, r, T, H, K, E)
        xb, ib, wb = u.make_inputs(rng, r, T, H, K, E)
        ca, cb = ep.EPConfig(E, T, H), ep.EPConfig(E, T, H)

        def fn(xa, ia, wa, xb, ib, wb):
            pa = ep.dispatch_send(xa, ia, ca)
            pb = ep.dispatch_send(xb, ib, cb)
            ra = ep.dispatch_recv(pa)
            qa = ep.combine_send(ra.recv_x, ia, wa, ra.handle, ca)
            rb = ep.dispatch_recv(pb)
            qb = ep.combine_send(rb.recv_x, ib, wb, rb.handle, cb)
            return ep.combine_recv(qa), ep.combine_recv(qb)

        oa, ob = u.shard_run(r, fn, xa, ia, wa, xb, ib, wb)
        for x, idx, w, o in ((xa, ia, wa, oa), (xb, ib, wb, ob)):
            want = x.astype(np.float32) * np.where(idx >= 0, w, 0).sum(-1, keepdims=True)
            np.testing.assert_allclose(o.astype(np.float32), want, rtol=2 ** -7, atol=1e-6,
                                       err_msg=f"seed {seed}")

    def test_vmap(self):
        r = 2
        rng, seed = u.fresh_rng()
        x, idx, w = u.make_inputs(rng, r, 2 * T, H, K, E)
        x, idx, w = (a.reshape((r, 2, T) + a.shape[2:]) for a in (x, idx, w))
        config = ep.EPConfig(E, T, H)
        whole = u.shard_run(r, jax.vmap(_whole(config, False, r)), x, idx, w)
        split = u.shard_run(r, jax.vmap(_split(config, False, r)), x, idx, w)
        for a, b in zip(split, whole):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                          f"seed {seed}")

    def test_errors(self):
        config = ep.EPConfig(E, T, H)
        with pytest.raises(TypeError, match="dispatch_recv takes what dispatch_send returned"):
            ep.dispatch_recv((1, 2))
        with pytest.raises(TypeError, match="combine_recv takes what combine_send returned"):
            ep.combine_recv(ep.PendingDispatch((), ()))
        x = jax.ShapeDtypeStruct((T + 1, H), jnp.bfloat16)
        idx = jax.ShapeDtypeStruct((T + 1, K), jnp.int32)
        with pytest.raises(ValueError, match="max_tokens_per_rank"):
            jax.eval_shape(lambda a, b: ep.dispatch_send(a, b, config, axis_name=None), x, idx)

    @parameterized.product(r=[1, 2, 4], use_fp8=[False, True])
    def test_gradients_equal_whole_calls(self, r, use_fp8):
        """jax.grad through the halves (w.r.t. x, topk_weights and an expert scale) is
        the whole calls' gradient, bit for bit; value_and_grad and jvp work too."""
        rng, seed = u.fresh_rng()
        x, idx, w = u.make_inputs(rng, r, T, H, K, E)
        c = rng.uniform(0.5, 2.0, (r, E // r)).astype(np.float32)
        g = rng.standard_normal((r, T, H)).astype(np.float32)
        config = ep.EPConfig(E, T, H)

        def loss(split, x, w, c, idx, g):
            if split:
                res = ep.dispatch_recv(ep.dispatch_send(x, idx, config, use_fp8=use_fp8))
            else:
                res = ep.dispatch(x, idx, config, use_fp8=use_fp8)
            rx = ep.dequantize(res.recv_x, res.recv_scales) if use_fp8 else res.recv_x
            y = (rx.astype(jnp.float32) * c[:, None, None]).astype(jnp.bfloat16)
            if split:
                out = ep.combine_recv(ep.combine_send(y, idx, w, res.handle, config))
            else:
                out = ep.combine(y, idx, w, res.handle, config)
            return jnp.sum(out.astype(jnp.float32) * g)

        def grads(split):
            def fn(x, w, c, idx, g):
                v, gr = jax.value_and_grad(loss, argnums=(1, 2, 3))(split, x, w, c, idx, g)
                _, t = jax.jvp(lambda xx: loss(split, xx, w, c, idx, g), (x,), (x,))
                return (v, t) + gr
            return u.shard_run(r, fn, x, w, c, idx, g)

        want, got = grads(False), grads(True)
        for name, a, b in zip(("loss", "jvp", "x", "topk_weights", "scale"), got, want):
            assert np.all(np.isfinite(np.asarray(a, np.float32))), f"seed {seed}: {name}"
            np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8),
                                          f"seed {seed}: {name}")
        assert np.abs(np.asarray(got[2], np.float32)).sum() > 0, f"seed {seed}: zero gradient"
