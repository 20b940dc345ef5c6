"""Expert-id checks in the graph: invalid_ids and dispatch(check_ids=True) with checkify."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.sharding import PartitionSpec as P

import jax_mscclpp_ep as ep
from _ep_util import fresh_rng, make_inputs, mesh_of

R, T, H, K, E = 2, 6, 128, 3, 8
CONFIG = ep.EPConfig(max_tokens_per_rank=T, hidden=H, num_experts=E)


def _checked(send_half: bool):
    """jit(checkify(shard_map(dispatch with check_ids))) -> (error, recv_x, recv_count)."""
    def body(x, idx):
        if send_half:
            res = ep.dispatch_recv(ep.dispatch_send(x[0], idx[0], CONFIG, check_ids=True))
        else:
            res = ep.dispatch(x[0], idx[0], CONFIG, check_ids=True)
        return res.recv_x[None], res.recv_count[None]

    f = jax.shard_map(body, mesh=mesh_of(R), in_specs=P("ep"), out_specs=P("ep"))
    return jax.jit(checkify.checkify(f, errors=checkify.user_checks))


def test_invalid_ids_counts_out_of_range_entries():
    rng, seed = fresh_rng()
    _, idx, _ = make_inputs(rng, 1, T, H, K, E)
    idx = idx[0]
    bad = rng.choice(idx.size, size=4, replace=False)
    flat = idx.reshape(-1)
    flat[bad[:2]] = rng.integers(E, 10 * E, size=2)
    flat[bad[2:]] = rng.integers(-10, -1, size=2)
    assert int(jax.jit(ep.invalid_ids, static_argnums=1)(idx, E)) == 4, seed
    assert int(ep.invalid_ids(np.where(idx >= E, -1, np.maximum(idx, -1)), E)) == 0


@pytest.mark.parametrize("send_half", [False, True], ids=["dispatch", "split"])
def test_check_ids_passes_good_routing_unchanged(send_half):
    rng, seed = fresh_rng()
    x, idx, _ = make_inputs(rng, R, T, H, K, E)
    err, (recv_x, count) = _checked(send_half)(jnp.asarray(x), jnp.asarray(idx))
    assert err.get() is None, seed
    def plain_body(a, b):
        res = ep.dispatch(a[0], b[0], CONFIG)
        return res.recv_x[None], res.recv_count[None]

    plain = jax.jit(jax.shard_map(plain_body, mesh=mesh_of(R), in_specs=P("ep"),
                                  out_specs=P("ep")))(jnp.asarray(x), jnp.asarray(idx))
    np.testing.assert_array_equal(np.asarray(count), np.asarray(plain[1]), err_msg=str(seed))
    np.testing.assert_array_equal(np.asarray(recv_x, np.float32), np.asarray(plain[0], np.float32))


@pytest.mark.parametrize("send_half", [False, True], ids=["dispatch", "split"])
def test_check_ids_reports_bad_routing(send_half):
    rng, seed = fresh_rng()
    x, idx, _ = make_inputs(rng, R, T, H, K, E)
    t, k = rng.integers(T), rng.integers(K)
    idx[1, t, k] = E + int(rng.integers(0, 5))  # rank 1 only
    err, _ = _checked(send_half)(jnp.asarray(x), jnp.asarray(idx))
    msg = err.get()
    assert msg is not None, seed
    name = "dispatch_send" if send_half else "dispatch"
    assert f"jax_mscclpp_ep.{name}: topk_idx holds 1 expert id outside [-1, {E}) across the EP " \
           "axis 'ep'" in msg, msg
    # Bad ids on both ranks: the message counts the whole group's.
    idx[0, (t + 1) % T, k] = -2
    idx[1, (t + 2) % T, (k + 1) % K] = 10 * E
    err, _ = _checked(send_half)(jnp.asarray(x), jnp.asarray(idx))
    assert f"topk_idx holds 3 expert ids outside [-1, {E})" in (err.get() or ""), err.get()


@pytest.mark.skipif(jax.__version_info__[:2] != (0, 10),
                    reason="the named message needs checkify's rule table as of jax 0.10 (ids.py)")
def test_check_ids_needs_checkify():
    rng, _ = fresh_rng()
    x, idx, _ = make_inputs(rng, 1, T, H, K, E)
    f = jax.jit(lambda a, b: ep.dispatch(a, b, CONFIG, axis_name=None, check_ids=True).recv_x)
    with pytest.raises(ValueError, match=r"jax_mscclpp_ep.dispatch\(check_ids=True\) adds a "
                       r"checkify check, which needs the jitted step wrapped in checkify: .*"
                       r"errors=checkify.user_checks"):
        f(jnp.asarray(x[0]), jnp.asarray(idx[0]))
