"""Every bad input fails at trace time with a message naming the argument and the rule."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_mscclpp_ep as ep

import _ep_util as u

CFG = ep.EPConfig(num_experts=8, max_tokens_per_rank=4, hidden=256)


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def _trace_dispatch(x, idx, r=2, config=CFG, **kw):
    def fn(xs, ids):
        res = ep.dispatch(xs[0], ids[0], config, **kw)
        return res.recv_count[None]

    f = jax.shard_map(fn, mesh=u.mesh_of(r), in_specs=P("ep"), out_specs=P("ep"))
    return jax.eval_shape(f, _sds((r,) + x[0], x[1]), _sds((r,) + idx[0], idx[1]))


GOOD_X = ((4, 256), jnp.bfloat16)
GOOD_IDX = ((4, 2), jnp.int32)


@pytest.mark.parametrize("x,idx,kw,pattern", [
    (((4, 256), jnp.float32), GOOD_IDX, {}, "x must be bfloat16"),
    (((2, 4, 256), jnp.bfloat16), GOOD_IDX, {}, r"x must have shape \[T, H\]"),
    (((5, 256), jnp.bfloat16), ((5, 2), jnp.int32), {}, r"T=5 .*max_tokens_per_rank M=4"),
    (((4, 128), jnp.bfloat16), GOOD_IDX, {}, "hidden size 128 .* hidden=256"),
    (GOOD_X, ((4, 2), jnp.float32), {}, "topk_idx must be int32 or int64"),
    (GOOD_X, ((4,), jnp.int32), {}, r"topk_idx must have shape \[T, K\]"),
    (GOOD_X, ((3, 2), jnp.int32), {}, "topk_idx has 3 rows but x/out has T=4"),
    (GOOD_X, ((4, 17), jnp.int32), {}, r"K=17 .* \[1, 16\]"),
    (GOOD_X, GOOD_IDX, {"round_scale": True}, "round_scale=True needs use_fp8=True"),
    (GOOD_X, GOOD_IDX, {"stats": jnp.zeros((3,), jnp.int32)}, r"stats must be int32 of shape"),
    (GOOD_X, GOOD_IDX, {"stats": jnp.zeros((4,), jnp.float32)}, r"stats must be int32 of shape"),
])
def test_dispatch_bad_args(x, idx, kw, pattern):
    with pytest.raises((TypeError, ValueError), match=pattern):
        _trace_dispatch(x, idx, **kw)


def test_fp8_needs_hidden_multiple_of_128():
    cfg = ep.EPConfig(8, 4, 200)
    with pytest.raises(ValueError, match="use_fp8 needs hidden to be a multiple of 128"):
        _trace_dispatch(((4, 200), jnp.bfloat16), GOOD_IDX, config=cfg, use_fp8=True)


def test_experts_not_divisible_by_axis():
    with pytest.raises(ValueError, match="num_experts=8 is not divisible by the EP axis size 3"):
        _trace_dispatch(GOOD_X, GOOD_IDX, r=3)


def test_unbound_axis():
    with pytest.raises(NameError, match="EP axis 'ep' is not bound"):
        jax.eval_shape(lambda x, i: ep.dispatch(x, i, CFG), _sds((4, 256), jnp.bfloat16),
                       _sds((4, 2), jnp.int32))


def test_not_a_buffer():
    with pytest.raises(TypeError, match="expected a jax_mscclpp_ep.Buffer or EPConfig"):
        ep.dispatch(jnp.zeros((4, 256), jnp.bfloat16), jnp.zeros((4, 2), jnp.int32), {"E": 8})


def _trace_combine(y, idx, w, src, lr, r=2, config=CFG, handle_type=None):
    def fn(ys, ids, ws, ss, ls):
        h = ep.DispatchHandle(ss[0], ls[0], jnp.zeros((), jnp.int32))
        if handle_type is not None:
            h = handle_type(h)
        return ep.combine(ys[0], ids[0], ws[0], h, config)[None]

    f = jax.shard_map(fn, mesh=u.mesh_of(r), in_specs=P("ep"), out_specs=P("ep"))
    return jax.eval_shape(f, *[_sds((r,) + a[0], a[1]) for a in (y, idx, w, src, lr)])


Y = ((4, 8, 256), jnp.bfloat16)
W = ((4, 2), jnp.float32)
SRC = ((4, 8), jnp.int32)
LR = ((4, 2, 2), jnp.int32)


def test_combine_good_args_trace():
    out = _trace_combine(Y, GOOD_IDX, W, SRC, LR)
    assert out.shape == (2, 4, 256)


@pytest.mark.parametrize("args,pattern", [
    ((((4, 8, 128), jnp.bfloat16), GOOD_IDX, W, SRC, LR), r"y must have shape \[LE, R\*M, H\]"),
    ((((4, 8, 256), jnp.float32), GOOD_IDX, W, SRC, LR), "y must be bfloat16"),
    ((Y, GOOD_IDX, ((4, 3), jnp.float32), SRC, LR), "topk_weights shape .* must equal topk_idx"),
    ((Y, GOOD_IDX, ((4, 2), jnp.bfloat16), SRC, LR), "topk_weights must be float32"),
    ((Y, ((5, 2), jnp.int32), ((5, 2), jnp.float32), SRC, LR), r"T=5 tokens, more than"),
    ((Y, GOOD_IDX, W, ((4, 7), jnp.int32), LR), r"handle.src_info must be int32\[4, 8\]"),
    ((Y, GOOD_IDX, W, SRC, ((4, 2), jnp.int32)), r"handle.layout_range must be int32\[4, 2, 2\]"),
])
def test_combine_bad_args(args, pattern):
    with pytest.raises((TypeError, ValueError), match=pattern):
        _trace_combine(*args)


def test_combine_handle_type():
    with pytest.raises(TypeError, match="handle must be the DispatchHandle"):
        _trace_combine(Y, GOOD_IDX, W, SRC, LR, handle_type=tuple)


@pytest.mark.parametrize("kw,pattern", [
    (dict(num_experts=0, max_tokens_per_rank=4, hidden=128), "num_experts must be a positive integer"),
    (dict(num_experts=8, max_tokens_per_rank=-1, hidden=128), "max_tokens_per_rank must be a positive"),
    (dict(num_experts=8, max_tokens_per_rank=4, hidden=1.5), "hidden must be a positive integer"),
    (dict(num_experts=2048, max_tokens_per_rank=4, hidden=128), "exceeds the limit 1024"),
    (dict(num_experts=8, max_tokens_per_rank=2048, hidden=128), "exceeds the limit 1024"),
])
def test_config_errors(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        ep.EPConfig(**kw)


def test_size_hint():
    m, h, r, e = 128, 7168, 2, 256
    got = ep.size_hint(m, h, r, e)
    dmsg = 16 + 2 * h
    send, recv = e * m * 2 * h, e * m * dmsg
    align = lambda n: -(-n // 128) * 128
    assert got == 2 * (align(send) + align(recv) + align(2 * e * 8)) + align((r + 1) * 8)
    assert ep.EPConfig(e, m, h).size_hint(r) == got
    with pytest.raises(ValueError, match="divisible by num_ranks"):
        ep.size_hint(m, h, 3, e)


def test_buffer_checks():
    mesh = u.mesh_of(2)
    buf = ep.Buffer(CFG, mesh=mesh)
    assert buf.num_ranks == 2 and "closed" not in repr(buf)
    with pytest.raises(ValueError, match="num_experts=8 is not divisible by the EP axis size 3"):
        ep.Buffer(CFG, mesh=u.mesh_of(3))
    with pytest.raises(ValueError, match="axis_name 'tp' is not an axis"):
        ep.Buffer(CFG, mesh=mesh, axis_name="tp")
    with pytest.raises(TypeError, match="config must be an EPConfig"):
        ep.Buffer({"num_experts": 8})
    # A buffer made for 2 ranks used on a 4-rank axis.
    f = jax.shard_map(lambda x, i: ep.dispatch(x[0], i[0], buf).recv_count[None],
                      mesh=u.mesh_of(4), in_specs=P("ep"), out_specs=P("ep"))
    with pytest.raises(ValueError, match="created for an EP group of 2 ranks but is used on an axis of size 4"):
        jax.eval_shape(f, _sds((4, 4, 256), jnp.bfloat16), _sds((4, 4, 2), jnp.int32))
    buf.close()
    buf.close()  # idempotent
    assert buf.closed and "closed" in repr(buf)
    with pytest.raises(ep.BufferClosedError, match="was closed"):
        _trace_dispatch(GOOD_X, GOOD_IDX, config=buf)


def test_failed_buffers_take_no_id():
    """Ids name each Buffer's key-value namespace across processes: a constructor that
    raised must not shift the numbering."""
    first = ep.Buffer(CFG, mesh=u.mesh_of(2))
    for bad in (dict(mesh=u.mesh_of(3)), dict(mesh=u.mesh_of(2), axis_name="tp"),
                dict(mesh=u.mesh_of(2), host_id="")):
        with pytest.raises(ValueError):
            ep.Buffer(CFG, **bad)
    with pytest.raises(TypeError):
        ep.Buffer({"num_experts": 8})
    assert ep.Buffer(CFG, mesh=u.mesh_of(2)).id == first.id + 1


def test_buffer_runs_on_cpu():
    rng, _ = u.fresh_rng()
    x, idx, w = u.make_inputs(rng, 2, 4, 256, 2, 8)
    with ep.Buffer(CFG, mesh=u.mesh_of(2)) as buf:
        def fn(xs, ids, ws):
            res = ep.dispatch(xs, ids, buf)
            return ep.combine(res.recv_x, ids, ws, res.handle, buf)
        out = u.shard_run(2, fn, x, idx, w).astype(np.float32)
    want = x.astype(np.float32) * np.where(idx >= 0, w, 0).sum(-1, keepdims=True)
    np.testing.assert_allclose(out, want, rtol=2 ** -7, atol=1e-6)
