"""Masked ranks on CPU (issue 17): dispatch / combine / their derivatives with ranks masked
on a Buffer equal plain-loop oracles run on routing where every slot the mask stops is -1;
mask -> run -> unmask -> run retraces; alive_experts under jit and shard_map; bad input."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from absl.testing import parameterized

import _ep_util as u
import jax_mscclpp_ep as ep

E, M, H, K = 16, 8, 128, 4


def new_buffer(r, **kw):
    return ep.Buffer(ep.EPConfig(num_experts=E, max_tokens_per_rank=M, hidden=H), mesh=u.mesh_of(r),
                     **kw)


def stopped(idx, masked, r):
    """idx with -1 where the mask stops the slot: expert owned by a masked rank, or a masked
    sender (the semantics written out independently of the reference)."""
    le = E // r
    out = np.array(idx, copy=True)
    for src in range(r):
        for t in range(idx.shape[1]):
            for k in range(idx.shape[2]):
                e = int(idx[src, t, k])
                if src in masked or (0 <= e < E and e // le in masked):
                    out[src, t, k] = -1
    return out


def step(buf, use_fp8=False):
    """f(x, idx, w, c) per rank: dispatch, y = rows * c[expert], combine."""
    le = E // buf.num_ranks

    def fn(xs, ids, ws, cs):
        res = ep.dispatch(xs, ids, buf, use_fp8=use_fp8, stats=jnp.full((le,), 3, jnp.int32))
        rx = ep.dequantize(res.recv_x, res.recv_scales) if use_fp8 else res.recv_x.astype(jnp.float32)
        y = (rx * cs[:, None, None]).astype(jnp.bfloat16)
        out = ep.combine(y, ids, ws, res.handle, buf)
        scales = res.recv_scales if use_fp8 else jnp.zeros((0,), jnp.float32)
        return (res.recv_x, scales, res.recv_count, res.handle.src_info, res.handle.layout_range,
                res.stats, y, out)
    return fn


def run_and_check(buf, rng, masked, use_fp8=False):
    r = buf.num_ranks
    x, idx, w = u.make_inputs(rng, r, M, H, K, E)
    c = rng.uniform(0.5, 2.0, (r, E // r)).astype(np.float32)
    *disp, stats, y, out = u.shard_run(r, step(buf, use_fp8), x, idx, w, c)
    want_idx = stopped(idx, set(masked), r)
    got = u.canonical_ranks(disp, M, use_fp8)
    want = u.oracle_dispatch(x, want_idx, E, M, use_fp8)
    for q in range(r):
        ep.testing.assert_dispatch_equal(got[q], want[q])
        np.testing.assert_array_equal(stats[q], got[q].recv_count + 3, "stats = stats + recv_count")
    want_out = u.oracle_combine(y, want_idx, w, disp[3], disp[4], E, M)
    np.testing.assert_allclose(out.astype(np.float32), want_out.astype(np.float32), rtol=2.0 ** -7,
                               atol=1e-6)
    for q in masked:  # a masked rank receives nothing and its combine is zeros
        assert not np.any(disp[2][q]) and not np.any(out[q].astype(np.float32)), q
    return out


class MaskedExchangeTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("r4_one", 4, (2,), False), ("r4_rank0_fp8", 4, (0,), True),
        ("r8_two", 8, (1, 6), False), ("r8_three_fp8", 8, (0, 3, 7), True))
    def test_matches_oracle_on_stopped_routing(self, r, masked, use_fp8):
        rng, seed = u.fresh_rng()
        buf = new_buffer(r, on_peer_failure="mask")
        buf.mask_ranks(list(masked))
        self.assertEqual(buf.masked_ranks(), sorted(masked), f"seed {seed}")
        run_and_check(buf, rng, masked, use_fp8)

    def test_mask_run_unmask_run_retraces(self):
        """One jitted function across mask changes: each run follows the current mask."""
        rng, _ = u.fresh_rng()
        r = 4
        buf = new_buffer(r)
        for masked in [(), (3,), (), (1, 2), ()]:
            buf.unmask_all()
            buf.mask_ranks(list(masked))
            out = run_and_check(buf, rng, masked)
            assert np.any(out.astype(np.float32)), "fresh routing gave an all-zero step"
        self.assertEqual(buf.masked_ranks(), [])
        self.assertEqual(buf.mask_events(), [])

    def test_mask_adds_and_records_user_events(self):
        buf = new_buffer(8)
        buf.mask_ranks([5])
        buf.mask_ranks((2, 5))
        self.assertEqual(buf.masked_ranks(), [2, 5])
        self.assertEqual(buf.mask_events(), [ep.MaskEvent(2, -1, "user"), ep.MaskEvent(5, -1, "user")])

    def test_split_halves_follow_the_mask(self):
        rng, _ = u.fresh_rng()
        r = 4
        buf = new_buffer(r)
        buf.mask_ranks([1])
        x, idx, w = u.make_inputs(rng, r, M, H, K, E)
        y = rng.standard_normal((r, E // r, r * M, H)).astype(ml_dtypes.bfloat16)

        def whole(xs, ids, ws, ys):
            res = ep.dispatch(xs, ids, buf)
            return res.recv_x, res.recv_count, ep.combine(ys, ids, ws, res.handle, buf)

        def split(xs, ids, ws, ys):
            res = ep.dispatch_recv(ep.dispatch_send(xs, ids, buf))
            return res.recv_x, res.recv_count, ep.combine_recv(
                ep.combine_send(ys, ids, ws, res.handle, buf))

        a, b = u.shard_run(r, whole, x, idx, w, y), u.shard_run(r, split, x, idx, w, y)
        for p, q in zip(a, b):
            np.testing.assert_array_equal(np.asarray(p, np.float32), np.asarray(q, np.float32))
        assert not np.any(a[1][1]), "the masked rank received rows"

    def test_global_reference_takes_the_mask(self):
        """dispatch_global / combine_global (the GPU tests' oracle) with masked= equal the
        shard_map reference under a Buffer's mask."""
        rng, _ = u.fresh_rng()
        r, masked = 4, (2,)
        buf = new_buffer(r)
        buf.mask_ranks(list(masked))
        x, idx, w = u.make_inputs(rng, r, M, H, K, E)
        c = np.ones((r, E // r), np.float32)
        *disp, _, y, out = u.shard_run(r, step(buf), x, idx, w, c)
        ref = ep.reference.dispatch_global(x, idx, num_experts=E, max_tokens=M, masked=masked)
        for q in range(r):
            ep.testing.assert_dispatch_equal(
                u.canonical_ranks(disp, M, False)[q],
                ep.testing.normalize_dispatch(ref.recv_x[q], None, ref.recv_count[q],
                                              ref.src_info[q], ref.layout_range[q], M))
        ref_out = ep.reference.combine_global(ref.recv_x, idx, w, ref.src_info, ref.layout_range,
                                              num_experts=E, max_tokens=M, masked=masked)
        np.testing.assert_array_equal(np.asarray(ref_out, np.float32), out.astype(np.float32))


class MaskedGradTest(parameterized.TestCase):

    @parameterized.named_parameters(("r4", 4, (1,)), ("r8", 8, (0, 5)))
    def test_grads_equal_those_of_the_stopped_routing(self, r, masked):
        """Gradients w.r.t. x (through dispatch), y and the weights (through combine) with the
        mask equal those of an unmasked Buffer given routing with the stopped slots at -1;
        the weight gradient of a stopped slot is 0."""
        rng, seed = u.fresh_rng()
        x, idx, w = u.make_inputs(rng, r, M, H, K, E)
        g = rng.standard_normal((r, M, H)).astype(np.float32)
        c = rng.uniform(0.5, 2.0, (r, E // r)).astype(np.float32)

        def grads(buf, ids_all):
            def fn(xs, ids, ws, cs, gs):
                def loss(xs, ws, cs):
                    res = ep.dispatch(xs, ids, buf)
                    y = (res.recv_x.astype(jnp.float32) * cs[:, None, None]).astype(jnp.bfloat16)
                    out = ep.combine(y, ids, ws, res.handle, buf)
                    return jnp.sum(out.astype(jnp.float32) * gs)
                return jax.grad(loss, argnums=(0, 1, 2))(xs, ws, cs)
            return u.shard_run(r, fn, x, ids_all, w, c, g)

        masked_buf = new_buffer(r)
        masked_buf.mask_ranks(list(masked))
        got = grads(masked_buf, idx)
        stop = stopped(idx, set(masked), r)
        want = grads(new_buffer(r), stop)
        for name, a, b in zip(("x", "w", "c"), got, want):
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                       rtol=1e-6, atol=1e-6, err_msg=f"grad {name}, seed {seed}")
        assert not np.any(got[1][stop < 0]), "a stopped slot got a weight gradient"
        assert np.any(got[1]), "no weight gradient at all"


class AliveTest(parameterized.TestCase):

    def test_router_under_jit_and_shard_map(self):
        """A router that reads alive_experts never picks a masked rank's expert."""
        rng, _ = u.fresh_rng()
        r = 8
        buf = new_buffer(r)
        logits = rng.standard_normal((r, M, E)).astype(np.float32)

        def route(lg):
            alive = ep.alive_experts(buf)
            return jax.lax.top_k(jnp.where(alive, lg, -jnp.inf), K)[1], alive, ep.alive_ranks(buf)

        for masked in [(), (4,), (0, 7)]:
            buf.unmask_all()
            buf.mask_ranks(list(masked))
            idx, alive, ranks = u.shard_run(r, route, logits)
            want = np.array([e // (E // r) not in masked for e in range(E)])
            np.testing.assert_array_equal(alive, np.broadcast_to(want, (r, E)))
            np.testing.assert_array_equal(ranks[0], [q not in masked for q in range(r)])
            assert want[idx].all(), f"routed to a masked rank's expert with mask {masked}"

    def test_outside_shard_map_and_after(self):
        buf = new_buffer(4)
        buf.mask_ranks([1])
        alive, order = jax.jit(lambda: ep.alive_experts(buf, return_order=True))()
        np.testing.assert_array_equal(alive, [e // 4 != 1 for e in range(E)])
        self.assertEqual(order.dtype, jnp.int32)
        np.testing.assert_array_equal(jax.jit(lambda: ep.alive_ranks(buf))(),
                                      [True, False, True, True])
        cfg_alive = jax.jit(lambda: ep.alive_experts(buf.config))()
        assert cfg_alive.all() and cfg_alive.shape == (E,)


class BadInputTest(parameterized.TestCase):

    @parameterized.named_parameters(("too_big", [4]), ("negative", [-1]), ("float", [1.0]),
                                    ("bool", [True]), ("string", ["1"]))
    def test_bad_ranks(self, ranks):
        buf = new_buffer(4)
        with pytest.raises(ValueError, match="rank"):
            buf.mask_ranks(ranks)
        self.assertEqual(buf.masked_ranks(), [])

    def test_single_int_is_refused(self):
        with pytest.raises(TypeError, match=r"pass \[2\]"):
            new_buffer(4).mask_ranks(2)

    def test_bad_policy(self):
        with pytest.raises(ValueError, match="on_peer_failure must be one of"):
            new_buffer(4, on_peer_failure="ignore")

    def test_closed_buffer(self):
        buf = new_buffer(4)
        buf.close()
        with pytest.raises(ep.BufferClosedError):
            buf.mask_ranks([1])
        with pytest.raises(ep.BufferClosedError):
            buf.masked_ranks()
