"""The pure-JAX reference (via the primitives' CPU lowering) against NumPy loops."""

import jax
import ml_dtypes
import numpy as np
import pytest
from absl.testing import parameterized

import jax_mscclpp_ep as ep
from jax_mscclpp_ep import reference, testing

import _ep_util as u


def _check_dispatch(r, t, h, k, e, m, *, use_fp8=False, round_scale=False, mask_frac=0.2,
                    idx=None, idx_dtype=np.int32):
    rng, seed = u.fresh_rng()
    x, rand_idx, _ = u.make_inputs(rng, r, t, h, k, e, mask_frac=mask_frac, idx_dtype=idx_dtype)
    idx = rand_idx if idx is None else idx.astype(idx_dtype)
    config = ep.EPConfig(num_experts=e, max_tokens_per_rank=m, hidden=h)
    outs = u.run_dispatch(config, x, idx, use_fp8=use_fp8, round_scale=round_scale)
    got = u.canonical_ranks(outs, m, use_fp8)
    want = u.oracle_dispatch(x, idx, e, m, use_fp8, round_scale)
    for rank in range(r):
        try:
            testing.assert_dispatch_equal(got[rank], want[rank])
        except AssertionError as err:
            raise AssertionError(f"rank {rank}, seed {seed}: {err}") from None
    return x, idx, outs, config


class DispatchVsOracle(parameterized.TestCase):

    @parameterized.product(r=[1, 2, 4, 8], use_fp8=[False, True])
    def test_random_routing(self, r, use_fp8):
        _check_dispatch(r, t=6, h=256, k=3, e=2 * r if r > 1 else 4, m=8, use_fp8=use_fp8)

    def test_round_scale(self):
        _check_dispatch(4, t=5, h=384, k=4, e=8, m=5, use_fp8=True, round_scale=True)

    def test_hidden_not_multiple_of_128_bf16(self):
        _check_dispatch(2, t=4, h=72, k=2, e=4, m=4)

    def test_every_slot_masked_for_a_token(self):
        rng, _ = u.fresh_rng()
        idx = np.stack([np.stack([rng.permutation(8)[:3] for _ in range(5)]) for _ in range(2)])
        idx[:, 2, :] = -1          # token 2 of every rank picks nothing
        idx[1, 0, :] = -1
        _, _, outs, _ = _check_dispatch(2, 5, 128, 3, 8, 6, idx=idx)
        assert all(2 not in set(outs[3][rank].ravel().tolist()) for rank in range(2))

    def test_everything_masked(self):
        idx = np.full((4, 5, 2), -1)
        _, _, outs, _ = _check_dispatch(4, 5, 128, 2, 8, 5, idx=idx)
        assert np.all(outs[2] == 0) and np.all(outs[3] == -1)

    def test_all_tokens_to_one_expert(self):
        r, t, e = 4, 7, 8
        idx = np.full((r, t, 2), -1)
        idx[:, :, 0] = 5
        _, _, outs, _ = _check_dispatch(r, t, 128, 2, e, 7, idx=idx)
        # expert 5 lives on rank 2 as local expert 1: it gets every token of every rank
        assert outs[2][2][1] == r * t and outs[2].sum() == r * t

    def test_all_remote(self):
        r, t, e = 4, 6, 8
        le = e // r
        rng, _ = u.fresh_rng()
        idx = np.zeros((r, t, 2), np.int64)
        for src in range(r):
            dst = (src + 1 + rng.integers(0, r - 1, size=t)) % r   # never this rank
            idx[src, :, 0] = dst * le
            idx[src, :, 1] = dst * le + 1
        _, _, outs, _ = _check_dispatch(r, t, 128, 2, e, t, idx=idx)
        for rank in range(r):
            off, cnt = testing.layout_numpy(outs[4][rank])
            assert np.all(cnt[:, rank] == 0)  # nothing from itself

    def test_all_local(self):
        r, t, e = 4, 6, 16
        le = e // r
        rng, _ = u.fresh_rng()
        idx = np.stack([np.stack([src * le + rng.permutation(le)[:3] for _ in range(t)])
                        for src in range(r)])
        _, _, outs, _ = _check_dispatch(r, t, 128, 3, e, t, idx=idx)
        for rank in range(r):
            off, cnt = testing.layout_numpy(outs[4][rank])
            assert np.all(np.delete(cnt, rank, axis=1) == 0)
            assert cnt[:, rank].sum() == 3 * t

    def test_t_less_than_m(self):
        _check_dispatch(2, t=3, h=128, k=2, e=4, m=16, use_fp8=True)

    def test_t_zero(self):
        _check_dispatch(2, t=0, h=128, k=2, e=4, m=4)

    def test_duplicate_expert_in_a_row_sends_once(self):
        idx = np.array([[[1, 1, -1], [0, 2, 0]], [[3, -1, 3], [2, 2, 2]]])
        _, _, outs, _ = _check_dispatch(2, 2, 128, 3, 4, 2, idx=idx)
        assert outs[2].sum() == 5

    def test_out_of_range_ids_are_dropped(self):
        idx = np.array([[[1, 7, -3], [0, 4, 2]], [[3, -1, 9], [100, 2, -2]]])
        _, _, outs, _ = _check_dispatch(2, 2, 128, 3, 4, 2, idx=idx)
        assert outs[2].sum() == 5

    def test_int64_indices(self):
        with jax.enable_x64(True):
            _, _, outs, _ = _check_dispatch(4, 5, 128, 3, 8, 6, idx_dtype=np.int64)
            assert outs[4].dtype == np.int64 and outs[4].shape == (4, 2, 4)

    def test_int64_ids_beyond_int32_are_dropped(self):
        # The low words are in range, the ids are not: narrowing to int32 first would
        # send 2**32 + 1 to expert 1 (the kernels compare the whole id).
        idx = np.array([[[1, 2**32 + 1, -2**32 + 2], [0, 2**32 + 3, 2]],
                        [[3, -1, 2**32], [2**33 + 1, 2, -2]]], np.int64)
        with jax.enable_x64(True):
            _, _, outs, _ = _check_dispatch(2, 2, 128, 3, 4, 2, idx=idx, idx_dtype=np.int64)
            assert outs[2].sum() == 5

    def test_layout_range_packing_x64(self):
        with jax.enable_x64(True):
            _, _, outs, _ = _check_dispatch(2, 6, 128, 3, 4, 6)
            lr = outs[4]
            assert lr.dtype == np.int64
        _, _, outs32, _ = _check_dispatch(2, 6, 128, 3, 4, 6)
        assert outs32[4].dtype == np.int32 and outs32[4].shape == (2, 2, 2, 2)


class FP8Cast(parameterized.TestCase):

    @parameterized.parameters(False, True)
    def test_cast_matches_numpy(self, round_scale):
        rng, seed = u.fresh_rng()
        x = (rng.standard_normal((9, 512)) * rng.uniform(1e-3, 1e3, (9, 1))).astype(ml_dtypes.bfloat16)
        x[3, :128] = 0  # an all-zero block uses the 1e-4 floor
        q, s = jax.jit(lambda a: reference.fp8_cast(a, round_scale))(x)
        for t in range(9):
            wq, ws = u.np_fp8(x[t], round_scale)
            np.testing.assert_array_equal(np.asarray(s[t]), ws, f"seed {seed} token {t}")
            np.testing.assert_array_equal(np.asarray(q[t]).view(np.uint8), wq.view(np.uint8))
        if round_scale:
            assert np.all(np.log2(np.asarray(s)) == np.round(np.log2(np.asarray(s))))

    def test_dequantized_error_is_e4m3_rounding(self):
        rng, _ = u.fresh_rng()
        x = rng.standard_normal((16, 256)).astype(ml_dtypes.bfloat16)
        q, s = reference.fp8_cast(x)
        back = np.asarray(reference.dequantize(q, s))
        xf = x.astype(np.float32)
        amax = np.abs(xf.reshape(16, 2, 128)).max(-1, keepdims=True)
        # e4m3 has 3 mantissa bits: relative step 2^-3, half of it after rounding,
        # and never worse than that fraction of the block's amax
        err = np.abs(back.reshape(16, 2, 128) - xf.reshape(16, 2, 128))
        assert np.all(err <= amax * 2.0 ** -4 + 1e-6)


class CombineVsOracle(parameterized.TestCase):

    @parameterized.parameters(1, 2, 4, 8)
    def test_random_y(self, r):
        rng, seed = u.fresh_rng()
        t, h, k, e, m = 5, 64, 3, max(2 * r, 4), 6
        x, idx, w = u.make_inputs(rng, r, t, h, k, e)
        idx[0, 1, 1] = idx[0, 1, 0]  # a duplicated expert: both slots weight the same row
        config = ep.EPConfig(e, m, h)
        outs = u.run_dispatch(config, x, idx)
        src_info, lr = outs[3], outs[4]
        le = e // r
        y = rng.standard_normal((r, le, r * m, h)).astype(ml_dtypes.bfloat16)

        def fn(ys, ids, ws, si, l):
            handle = ep.DispatchHandle(si, l, jax.numpy.zeros((), jax.numpy.int32))
            return ep.combine(ys, ids, ws, handle, config)

        got = u.shard_run(r, fn, y, idx, w, src_info, lr).astype(np.float32)
        want = u.oracle_combine(y, idx, w, src_info, lr, e, m).astype(np.float32)
        np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=1e-2, err_msg=f"seed {seed}")
        glob = np.asarray(reference.combine_global(y, idx, w, src_info, lr, num_experts=e,
                                                   max_tokens=m)).astype(np.float32)
        np.testing.assert_array_equal(got, glob)

    def test_token_with_no_expert_gets_zeros(self):
        rng, _ = u.fresh_rng()
        x, idx, w = u.make_inputs(rng, 2, 4, 128, 2, 4, mask_frac=0.0)
        idx[:, 1] = -1
        config = ep.EPConfig(4, 4, 128)

        def fn(xs, ids, ws):
            res = ep.dispatch(xs, ids, config)
            return ep.combine(res.recv_x, ids, ws, res.handle, config)

        out = u.shard_run(2, fn, x, idx, w)
        assert np.all(out[:, 1].astype(np.float32) == 0)
        assert np.all(np.abs(out[:, 0].astype(np.float32)).sum(-1) > 0)


class GlobalMatchesShard(parameterized.TestCase):

    @parameterized.product(r=[2, 4], use_fp8=[False, True])
    def test_dispatch_global(self, r, use_fp8):
        rng, seed = u.fresh_rng()
        x, idx, _ = u.make_inputs(rng, r, 6, 256, 3, 4 * r)
        outs = u.run_dispatch(ep.EPConfig(4 * r, 8, 256), x, idx, use_fp8=use_fp8)
        glob = reference.dispatch_global(x, idx, num_experts=4 * r, max_tokens=8, use_fp8=use_fp8)
        for i, (a, b) in enumerate(zip(outs, glob)):
            if i == 1 and not use_fp8:
                continue  # no scales without fp8
            np.testing.assert_array_equal(np.asarray(a).view(np.uint8),
                                          np.asarray(b).view(np.uint8), f"seed {seed}")
