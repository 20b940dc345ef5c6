"""The DeepEP-named face (deepep.py) on CPU: a DeepEP-style step body (_deepep_steps.py) through
Buffer.low_latency_dispatch / low_latency_combine equals the plain API bit for bit
(bf16 and fp8, with and without the receive hook, with statistics); UE8M0 scales;
the checks and the parts not offered."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mscclpp_ep as ep
from jax_mscclpp_ep import deepep

import _deepep_steps as steps
import _ep_util as u

R, T, H, K, E = 8, 10, 512, 4, 16
M = 12  # num_max_dispatch_tokens_per_rank (> T: not every rank fills its slots)


def _buffer():
    return ep.Buffer(ep.EPConfig(num_experts=E, max_tokens_per_rank=M, hidden=H), mesh=u.mesh_of(R))


def _inputs(rng):
    x, idx, w = u.make_inputs(rng, R, T, H, K, E, idx_dtype=np.int64)
    stats = rng.integers(0, 100, (R, E // R)).astype(np.int32)
    return x, idx, w, stats


@pytest.mark.parametrize("use_fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("hook", [False, True], ids=["whole", "hook"])
def test_deepep_step_equals_plain_api(use_fp8, hook):
    rng, seed = u.fresh_rng()
    args = _inputs(rng)
    buf = _buffer()
    got = u.shard_run(R, steps.deepep_step(buf, use_fp8, hook), *args)
    want = u.shard_run(R, steps.plain_step(buf, use_fp8), *args)
    names = ("recv_x", "scales", "recv_count", "src_info", "layout_range", "stats", "combined_x")
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8), f"seed {seed}: {name}")
    assert (got[5] >= args[3]).all() and got[5].sum() > args[3].sum(), f"seed {seed}: stats"


def test_ue8m0_scales_are_the_rounded_scales_packed():
    rng, seed = u.fresh_rng()
    x, idx, _, _ = _inputs(rng)
    buf = _buffer()

    def face(x, topk_idx):
        (fp8, packed), *_ = buf.low_latency_dispatch(x, topk_idx, M, E, round_scale=True,
                                                     use_ue8m0=True)
        return fp8, packed, deepep.unpack_ue8m0(packed, H // 128)

    def plain(x, topk_idx):
        res = ep.dispatch(x, topk_idx, buf, use_fp8=True, round_scale=True)
        return res.recv_x, res.recv_scales

    fp8, packed, unpacked = u.shard_run(R, face, x, idx)
    want_x, want_s = u.shard_run(R, plain, x, idx)
    assert packed.dtype == np.int32 and packed.shape == (R, E // R, R * M, H // 512)
    np.testing.assert_array_equal(fp8.view(np.uint8), want_x.view(np.uint8), f"seed {seed}")
    np.testing.assert_array_equal(unpacked, want_s, f"seed {seed}")
    # byte i of int32 p is the biased exponent of scale 4p + i
    bytes_ = packed.view(np.uint8).reshape(want_s.shape)
    np.testing.assert_array_equal(bytes_, (want_s.view(np.uint32) >> 23).astype(np.uint8))


def test_ue8m0_pads_a_partial_pack():
    s = jnp.asarray([[2.0 ** -3, 2.0 ** 5, 1.0, 2.0 ** -20, 0.5, 4.0]], jnp.float32)
    packed = deepep.pack_ue8m0(s)
    assert packed.shape == (1, 2)
    np.testing.assert_array_equal(deepep.unpack_ue8m0(packed, 6), s)


def test_size_hint_and_results_pytree():
    assert ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256) == ep.size_hint(128, 7168, 8, 256)
    assert _buffer().get_low_latency_rdma_size_hint(M, H, R, E) == ep.size_hint(M, H, R, E)
    res = deepep.Results((jnp.ones(2), None), stats=jnp.zeros(3), order=None)
    back = jax.tree.map(lambda a: a + 1, res)
    assert isinstance(back, deepep.Results) and len(back) == 2
    np.testing.assert_array_equal(back[0], 2.0)
    np.testing.assert_array_equal(back.stats, 1)


def test_shapes_must_match_the_buffer():
    buf = _buffer()
    x = jax.ShapeDtypeStruct((T, H), jnp.bfloat16)
    idx = jax.ShapeDtypeStruct((T, K), jnp.int32)
    with pytest.raises(ValueError, match=r"num_max_dispatch_tokens_per_rank=64 but the Buffer was "
                                         rf"created with max_tokens_per_rank={M}"):
        buf.low_latency_dispatch(x, idx, 64, E)
    with pytest.raises(ValueError, match=rf"num_experts=256 but the Buffer was created with "
                                         rf"num_experts={E}"):
        buf.low_latency_dispatch(x, idx, M, 256)
    with pytest.raises(ValueError, match="use_ue8m0=True needs use_fp8=True and round_scale=True"):
        buf.low_latency_dispatch(x, idx, M, E, use_ue8m0=True)
    with pytest.raises(NotImplementedError, match="dispatch_wait_recv_cost_stats"):
        buf.low_latency_dispatch(x, idx, M, E, None, object())


def test_parts_not_offered_say_why():
    buf = _buffer()
    with pytest.raises(NotImplementedError, match="JAX arrays are immutable"):
        buf.get_next_low_latency_combine_buffer(None)
    y = jnp.zeros((E // R, R * M, H), jnp.bfloat16)
    idx, w = jnp.zeros((T, K), jnp.int32), jnp.zeros((T, K), jnp.float32)
    for kw, what in (({"zero_copy": True}, "zero_copy"), ({"use_logfmt": True}, "use_logfmt"),
                     ({"out": y}, "out="), ({"combine_wait_recv_cost_stats": y}, "wait_recv")):
        with pytest.raises(NotImplementedError, match=what):
            buf.low_latency_combine(y, idx, w, None, **kw)
