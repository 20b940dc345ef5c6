"""The LL cases every rank process runs (tests/mp_launch.py starts the group; a single
process holding every rank runs them as well): dispatch + combine on the group's
Buffers against the pure-JAX reference. On CPU devices the calls lower to that
reference, so these check the harness there; cases that need the kernels skip."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jax_mscclpp_ep as ep
from jax_mscclpp_ep import testing
from ll_check import F32, check_step, expected, expert_scales, inputs, split_step_fn, y_of


def needs_kernels(group, why):
    if not group.on_gpu:
        pytest.skip(f"{why}: only the CUDA kernels have it (this group runs the CPU reference)")


def test_size_hint(group):
    """The kernels' buffer layout (C++) and EPConfig's size_hint formula agree at this R."""
    from jax_mscclpp_ep import native
    if not hasattr(native.ext, "ll_size_hint"):
        pytest.skip("built without the CUDA LL kernels")
    r = group.num_ranks
    for (m, h, e) in [(128, 7168, 256), (1, 128, 2 * r), (1024, 8192, 1024), (37, 5120, 64)]:
        assert native.ext.ll_size_hint(m, h, r, e) == ep.size_hint(m, h, r, e), (m, h, e)


def test_peer_channels(group):
    """Each rank reaches peers of its own (simulated) host through memory channels
    (CUDA-IPC port channels if forced) and peers of other hosts through UCX."""
    needs_kernels(group, "peer channels")
    per_host, forced = group.settings.ranks_per_host, group.settings.force_port
    chans = group.buffer(64, 128, 2048).peer_channels()
    for r, kinds in chans.items():
        for p, how in enumerate(kinds):
            if per_host and p != r:
                same = p // per_host == r // per_host
                want = ("cuda-ipc" if forced else "memory") if same else "ucx"
                assert how.split("\n")[0] == want, f"rank {r} -> {p}: {how[:200]} (want {want})"
            if how.startswith("ucx"):
                group.log(f"rank {r} -> peer {p}: {how.strip()}")
    group.log(f"channels: { {r: [h.split(chr(10))[0] for h in k] for r, k in chans.items()} }")


# name: (tokens T of M = 128, routing, fp8, round_scale); E = 64, H = 2048, K = 8.
# T <= 4: the dispatch kernel takes slots from the ids, not atomics (ll_dispatch.cu).
STEPS = {
    "t_one": (1, "random", True, False),
    "t_two": (2, "random", False, False),
    "t_three_dups": (3, "dups", False, False),
    "t_four_one_expert": (4, "one_expert", True, False),
    "basic_bf16": (128, "random", False, False),
    "basic_fp8": (128, "random", True, False),
    "fp8_round_scale": (128, "random", True, True),
    "t_less_than_m": (37, "random", True, False),
    "t_zero": (0, "random", False, False),
    "all_masked": (128, "masked", True, False),
    "one_expert": (128, "one_expert", False, False),
    "all_remote": (128, "remote", True, False),
    "all_local": (128, "local", False, False),
    "dups_and_bad_ids": (128, "dups", False, False),
}


@pytest.mark.parametrize("name", list(STEPS))
def test_step(group, rng, name):
    t, routing, use_fp8, round_scale = STEPS[name]
    check_step(group, rng, group.buffer(64, 128, 2048),
               *inputs(rng, group.num_ranks, t, 2048, 8, 64, routing=routing),
               use_fp8=use_fp8, round_scale=round_scale)


def test_tokens_beyond_the_grid(group, rng):
    """T = 256 tokens on M = 256 (more than an H200's 132 SMs, one block each): every
    dispatch block sends several tokens and every combine block has a token to reduce,
    so all of them spin on signals at once. With port peers the proxy's work on this
    GPU must still find an SM: a launch that took every SM timed out here."""
    check_step(group, rng, group.buffer(64, 256, 2048),
               *inputs(rng, group.num_ranks, 256, 2048, 8, 64), use_fp8=False)


@pytest.mark.parametrize("use_fp8", [False, True], ids=["bf16", "fp8"])
def test_split_halves(group, rng, use_fp8):
    """dispatch_send/recv and combine_send/recv give exactly the whole calls' results."""
    buf = group.buffer(64, 128, 2048)
    f = split_step_fn(group, buf, use_fp8)
    for _ in range(2):
        check_step(group, rng, buf, *inputs(rng, group.num_ranks, 128, 2048, 8, 64),
                   use_fp8=use_fp8, fn=f)


def test_two_buffers(group, rng):
    """Two Buffers of different shapes used in turn, each step replayed."""
    a, b = group.buffer(64, 128, 2048), group.buffer(32, 64, 1024)
    fa = fb = None
    for _ in range(2):
        fa = check_step(group, rng, a, *inputs(rng, group.num_ranks, 128, 2048, 8, 64), fn=fa)
        fb = check_step(group, rng, b, *inputs(rng, group.num_ranks, 64, 1024, 4, 32),
                        use_fp8=True, fn=fb)


def test_vmap(group, rng):
    """dispatch under vmap: a batch of two routings, each equal to its own reference."""
    buf, r = group.buffer(64, 128, 2048), group.num_ranks
    batch = [inputs(rng, r, 128, 2048, 8, 64)[:2] for _ in range(2)]

    def fn(xs, ids):
        res = jax.vmap(lambda a, b: ep.dispatch(a, b, buf))(xs, ids)
        return res.recv_x, res.recv_count, res.handle.src_info, res.handle.layout_range

    xb = np.stack([b[0] for b in batch], axis=1)   # [R, 2, T, H]
    ib = np.stack([b[1] for b in batch], axis=1)
    got = [group.local(o) for o in group.sharded(fn)(group.put(xb), group.put(ib))]
    for bi, (xx, ii) in enumerate(batch):
        with jax.default_device(group.cpu):
            ref = jax.tree.map(np.asarray, ep.reference.dispatch_global(
                jnp.asarray(xx), jnp.asarray(ii), num_experts=64, max_tokens=128))
        for rank in got[0]:
            rx, cnt, src, lr = (g[rank][bi] for g in got)
            testing.assert_dispatch_equal(
                testing.normalize_dispatch(rx, None, cnt, src, lr, 128),
                testing.normalize_dispatch(ref.recv_x[rank], None, ref.recv_count[rank],
                                           ref.src_info[rank], ref.layout_range[rank], 128))
    buf.check()


def test_loop_1000(group, rng):
    """JMEP_MP_STEPS (default 1,000) fp8 steps in one jitted loop, ordered through
    `after`/return_order: the stats add up, the mean combine equals one step's."""
    run_loop(group, rng, group.buffer(64, 128, 2048), group.settings.steps)


def run_loop(group, rng, buf, steps):
    r, le = group.num_ranks, 64 // group.num_ranks
    x, idx, w = inputs(rng, r, 128, 2048, 8, 64)
    c = expert_scales(rng, group, buf)

    def fn(xs, ids, ws, cs):
        def body(i, carry):
            order, stats, acc = carry
            res = ep.dispatch(xs, ids, buf, use_fp8=True, stats=stats, after=order)
            out, order = ep.combine(y_of(res.recv_x, res.recv_scales, cs, True), ids, ws,
                                    res.handle, buf, return_order=True)
            return order, res.stats, acc + out.astype(F32)
        vz = lambda shape, dt: jnp.zeros(shape, dt) + jnp.sum(ids[:0]).astype(dt)  # varying over ep
        init = (vz((), jnp.int32), vz((le,), jnp.int32), vz(xs.shape, F32))
        _, stats, acc = lax.fori_loop(0, steps, body, init)
        return stats, acc

    t0 = time.perf_counter()
    stats, acc = (group.local(o) for o in group.sharded(fn)(*(group.put(a) for a in (x, idx, w, c))))
    dt = time.perf_counter() - t0
    ref, out_ref = expected(group, buf, x, idx, w, c, True, False)
    for rank in stats:
        np.testing.assert_array_equal(stats[rank], steps * ref.recv_count[rank], "stats after loop")
        np.testing.assert_allclose(acc[rank] / steps, out_ref[rank].astype(np.float32),
                                   rtol=2.0 ** -7, atol=1e-5, err_msg="combine in loop")
    group.log(f"loop of {steps} dispatch+combine steps: {dt:.2f} s incl. compile")
    buf.check()


# Large shapes (skipped by the quick configurations): (E, M, H, K, fp8); T = M.
SHAPES = {
    "hidden_sweep-4096-fp8": (16, 128, 4096, 8, True),
    "hidden_sweep-5120-fp8": (16, 128, 5120, 8, True),
    "hidden_sweep-8192-fp8": (16, 128, 8192, 8, True),
    "hidden_sweep-8192-bf16": (16, 128, 8192, 8, False),
    "bench_shape-fp8": (256, 128, 7168, 8, True),    # the benchmark's shape
    "bench_shape-bf16": (256, 128, 7168, 8, False),
    "big_e_k16": (1024, 32, 1024, 16, True),
    "m1024": (64, 1024, 256, 4, True),
}


@pytest.mark.large
@pytest.mark.parametrize("name", list(SHAPES))
def test_shape(group, rng, name):
    e, m, h, k, use_fp8 = SHAPES[name]
    check_step(group, rng, group.buffer(e, m, h), *inputs(rng, group.num_ranks, m, h, k, e),
               use_fp8=use_fp8)


@pytest.mark.parametrize("t", [3, 128])
def test_int64_wide_ids(group, rng, t):
    """int64 ids whose low 32 bits are in range but the id is not: dropped, not sent
    (T = 3 takes the slots from the ids, T = 128 from the atomic claims)."""
    jax.config.update("jax_enable_x64", True)
    try:
        check_step(group, rng, group.buffer(64, 128, 2048),
                   *inputs(rng, group.num_ranks, t, 2048, 8, 64, routing="wide",
                           idx_dtype=np.int64), use_fp8=t == 3)
    finally:
        jax.config.update("jax_enable_x64", False)


def test_int64_x64(group, rng):
    """int64 topk_idx with jax_enable_x64 (layout_range becomes int64[LE, R])."""
    jax.config.update("jax_enable_x64", True)
    try:
        check_step(group, rng, group.buffer(64, 128, 2048),
                   *inputs(rng, group.num_ranks, 128, 2048, 8, 64, idx_dtype=np.int64),
                   use_fp8=True)
    finally:
        jax.config.update("jax_enable_x64", False)

