"""GPU tests run in this process on the GPUs it sees (one is enough; R = their
number, at most 2): gradients through the kernels against the reference's
gradients on CPU, the MoE layer against the dense model, expert ids outside
[-1, E) counted and dropped, the examples with --gpu. Fresh random data."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_mscclpp_ep as ep
from jax_mscclpp_ep import moe

import _ep_util as u

pytestmark = pytest.mark.gpu
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gpus():
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        return []
    from jax_mscclpp_ep import native
    if not native.cuda_enabled():
        return []
    return sorted(gpus, key=lambda d: d.id)[:2]


@pytest.fixture(scope="module")
def gpu_mesh():
    gpus = _gpus()
    if not gpus:
        pytest.skip("needs a GPU and the CUDA build")
    return Mesh(np.array(gpus), ("ep",))


def _grads(mesh, buf, x, idx, w, w1, g):
    """d/d(x, w, w1) of sum_ranks <g, combine(tanh(dispatch(x) @ w1), w)>."""
    def body(x, idx, w, w1, g):
        res = ep.dispatch(x[0], idx[0], buf)
        rows = res.recv_x.shape[1]
        valid = (jnp.arange(rows)[None, :] < res.recv_count[:, None])[..., None]
        rx = jnp.where(valid, res.recv_x, jnp.zeros((), res.recv_x.dtype))  # padding: no token
        hid = jnp.einsum("enh,ehf->enf", rx, w1[0].astype(jnp.bfloat16),
                         preferred_element_type=jnp.float32)
        y = jnp.tanh(hid).astype(jnp.bfloat16)
        out = ep.combine(y, idx[0], w[0], res.handle, buf)
        return jnp.sum(out.astype(jnp.float32) * g[0])[None]

    f = jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))
    loss = lambda x, w, w1, idx, g: jnp.sum(f(x, idx, w, w1, g))
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P("ep")))
    args = [put(a) for a in (x, w, w1, idx, g)]
    val, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*args)
    return float(val), [np.asarray(v) for v in grads]


def test_gradients_match_reference(gpu_mesh):
    r = gpu_mesh.size
    t, h, k, e = 24, 256, 4, 8
    rng, seed = u.fresh_rng()
    x, idx, w = u.make_inputs(rng, r, t, h, k, e)
    w1 = (rng.standard_normal((r, e // r, h, h)) / np.sqrt(h)).astype(np.float32)
    g = rng.standard_normal((r, t, h)).astype(np.float32)
    config = ep.EPConfig(e, t, h)
    with ep.Buffer(config, mesh=gpu_mesh, axis_name="ep") as buf:
        v_gpu, g_gpu = _grads(gpu_mesh, buf, x, idx, w, w1, g)
        buf.check()
    cpu_mesh = Mesh(np.array(jax.devices("cpu")[:r]), ("ep",))
    with jax.default_device(jax.devices("cpu")[0]):
        v_ref, g_ref = _grads(cpu_mesh, ep.Buffer(config, mesh=cpu_mesh, axis_name="ep"),
                              x, idx, w, w1, g)
    # The loss is a sum of T*H terms of either sign (it may cancel to near 0), and XLA:CPU may
    # skip combine's bf16 rounding inside the fused loss (excess precision): bound the
    # difference by the terms' size, |out| <= sum_k w (|tanh| <= 1). A lost row costs ~|g|*sqrt(H).
    scale = float(np.sum(np.abs(g) * np.sum(np.where(idx >= 0, w, 0), -1)[..., None]))
    assert abs(v_gpu - v_ref) <= 1e-4 * scale, f"seed {seed}: loss {v_gpu} vs {v_ref} (scale {scale})"
    for name, a, b in zip(("x", "topk_weights", "w1"), g_gpu, g_ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert u.norm_rel_err(a, b) < 1e-2, f"seed {seed}: grad {name} norm rel err {u.norm_rel_err(a, b)}"


@pytest.mark.parametrize("ffn", ["bucketed", "masked", "ragged"])
def test_moe_layer_matches_dense(gpu_mesh, ffn):
    r = gpu_mesh.size
    hdim, f, e, k, n = 256, 128, 8, 2, 32 * r
    rng, seed = u.fresh_rng()
    params = moe.init_params(jax.random.key(int(rng.integers(1 << 31))), hdim, f, e, scale=2.0)
    x = jnp.asarray(rng.standard_normal((n, hdim)), jnp.bfloat16)
    c = jnp.asarray(rng.standard_normal((n, hdim)), jnp.float32)
    with ep.Buffer(ep.EPConfig(e, n // r, hdim), mesh=gpu_mesh, axis_name="ep") as buf:
        f_ep = moe.sharded_moe(gpu_mesh, buf, top_k=k, ffn=ffn)
        out_ep = jax.jit(f_ep)(params, x)
        g_ep = jax.jit(jax.grad(lambda p: jnp.sum(c * f_ep(p, x).astype(jnp.float32))))(params)
        buf.check()
    out_d = jax.jit(lambda p: moe.moe_dense(p, x, top_k=k))(params)
    g_d = jax.jit(jax.grad(lambda p: jnp.sum(c * moe.moe_dense(p, x, top_k=k).astype(jnp.float32))))(params)
    assert u.rel_err(out_ep, out_d) < 1e-2, f"seed {seed}: output rel err {u.rel_err(out_ep, out_d)}"
    for key in ("router", "w_in", "w_out"):
        assert u.norm_rel_err(g_ep[key], g_d[key]) < 2e-2, f"seed {seed}: grad {key} {u.norm_rel_err(g_ep[key], g_d[key])}"


def test_bad_expert_ids_dropped_and_counted(gpu_mesh):
    """Ids outside [-1, E) never reach memory: dropped like -1, counted on the device."""
    r = gpu_mesh.size
    t, h, k, e = 64, 128, 4, 8
    rng, seed = u.fresh_rng()
    x, idx, w = u.make_inputs(rng, r, t, h, k, e)
    bad = rng.random(idx.shape) < 0.25
    idx = np.where(bad, rng.choice([-7, -2, e, e + 1, 10 ** 6], size=idx.shape), idx).astype(np.int32)
    n_bad = int(bad.sum())
    with ep.Buffer(ep.EPConfig(e, t, h), mesh=gpu_mesh, axis_name="ep") as buf:
        def body(x, idx):
            res = ep.dispatch(x[0], idx[0], buf)
            return res.recv_count[None]
        f = jax.jit(jax.shard_map(body, mesh=gpu_mesh, in_specs=P("ep"), out_specs=P("ep")))
        put = lambda a: jax.device_put(a, NamedSharding(gpu_mesh, P("ep")))
        counts = np.asarray(f(put(x), put(idx)))
        buf.check()
        assert buf.dropped_ids() == n_bad, f"seed {seed}"

        # The same count in the graph, and the checkify check (check_ids=True).
        def checked(x, idx):
            res = ep.dispatch(x[0], idx[0], buf, check_ids=True)
            return res.recv_count[None], ep.invalid_ids(idx[0], e)[None]
        g = jax.jit(checkify.checkify(
            jax.shard_map(checked, mesh=gpu_mesh, in_specs=P("ep"), out_specs=P("ep")),
            errors=checkify.user_checks))
        err, (counts2, n_in_graph) = g(put(x), put(idx))
        assert int(np.asarray(n_in_graph).sum()) == n_bad, f"seed {seed}"
        assert "expert ids outside [-1, 8)" in (err.get() or ""), f"seed {seed}: {err.get()}"
        np.testing.assert_array_equal(np.asarray(counts2), counts, f"seed {seed}")
        err, _ = g(put(x), put(np.where(bad, -1, idx).astype(np.int32)))
        assert err.get() is None, f"seed {seed}"
    good = np.where((idx >= 0) & (idx < e), idx, -1)
    want = np.zeros(e, np.int64)
    for src in range(r):
        for tok in range(t):
            for ex in set(int(v) for v in good[src, tok] if v >= 0):
                want[ex] += 1
    np.testing.assert_array_equal(counts.reshape(-1), want, f"seed {seed}")


@pytest.mark.parametrize("name,args,success", [
    ("quickstart", ["--tokens", "32"], "OK: quickstart"),
    ("decode_loop", ["--steps", "8"], "OK: decode loop matches the dense model"),
    ("route_tokens", ["--tokens", "64"], "OK: expert-parallel MoE output"),
    ("train_moe", ["--steps", "30"], "OK: EP training matches non-EP training"),
])
def test_example_on_gpu(gpu_mesh, name, args, success):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name + ".py"), "--gpu",
                           *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    print(out[-3000:])
    assert proc.returncode == 0 and success in proc.stdout, f"{name} --gpu failed:\n{out[-4000:]}"


def test_unsupported_hidden_rejected_at_buffer_creation(gpu_mesh):
    for h in (8320, 200):
        with pytest.raises(ValueError, match=rf"multiple of 128 and <= 8192, got {h}"):
            ep.Buffer(ep.EPConfig(8, 16, h), mesh=gpu_mesh, axis_name="ep")


def _dispatch_fn(mesh, buf):
    return jax.jit(jax.shard_map(lambda a, b: ep.dispatch(a[0], b[0], buf).recv_count[None],
                                 mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))


def test_closed_buffer_fails_clearly_inside_compiled_function(gpu_mesh):
    """A jitted function compiled for a Buffer keeps no dangling state after close():
    its executable holds the Buffer's device state (the FFI instantiate stage), so running
    it again reaches the FFI handler, which says the Buffer was closed. (Replayed from a
    CUDA graph without the handler, the kernels see the closed mark and return at once.)"""
    r = gpu_mesh.size
    rng, _ = u.fresh_rng()
    x, idx, _ = u.make_inputs(rng, r, 16, 256, 2, 8)
    buf = ep.Buffer(ep.EPConfig(8, 16, 256), mesh=gpu_mesh, axis_name="ep")
    f = _dispatch_fn(gpu_mesh, buf)
    put = lambda a: jax.device_put(a, NamedSharding(gpu_mesh, P("ep")))
    args = (put(x), put(idx))
    jax.block_until_ready(f(*args))
    buf.close()
    with pytest.raises(Exception, match=rf"Buffer {buf.id} was closed"):
        jax.block_until_ready(f(*args))
    with pytest.raises(ep.BufferClosedError):
        buf.check()


def test_close_keeps_other_compiled_functions(gpu_mesh):
    """Buffer.close() drops no compiled code: a function compiled before it (on another
    Buffer) runs afterwards without recompiling, and so does plain jitted code."""
    r = gpu_mesh.size
    rng, _ = u.fresh_rng()
    x, idx, _ = u.make_inputs(rng, r, 16, 256, 2, 8)
    put = lambda a: jax.device_put(a, NamedSharding(gpu_mesh, P("ep")))
    args = (put(x), put(idx))
    keep = ep.Buffer(ep.EPConfig(8, 16, 256), mesh=gpu_mesh, axis_name="ep")
    gone = ep.Buffer(ep.EPConfig(8, 16, 256), mesh=gpu_mesh, axis_name="ep")
    f, g = _dispatch_fn(gpu_mesh, keep), _dispatch_fn(gpu_mesh, gone)
    plain = jax.jit(lambda a: a * 2)
    want = np.asarray(f(*args))
    jax.block_until_ready((g(*args), plain(args[0])))
    compiles = []
    listener = lambda event, *_, **__: compiles.append(event) if "compil" in event else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        gone.close()
        np.testing.assert_array_equal(np.asarray(f(*args)), want)
        jax.block_until_ready(plain(args[0]))
    finally:
        getattr(jax.monitoring, "unregister_event_duration_listener",
                getattr(jax.monitoring, "unregister_event_duration_secs_listener", None))(listener)
        keep.close()
    assert f._cache_size() == 1 and plain._cache_size() == 1
    assert not compiles, f"recompiled after Buffer.close(): {compiles}"


def _ll_calls_in_graphs(hlo_path) -> tuple[int, int]:
    """(LL custom calls in this compiled module, how many of them run inside a command buffer).

    Newer XLA forms command buffers from the thunk sequence (dumped as
    *.thunk_sequence_after_thunk_passes.txt: a kCommandBuffer thunk with the
    captured thunks indented under it); older XLA outlines them in HLO as
    computations named command_buffer*. Custom-call thunks do not name their
    target, so the module must hold no custom calls but ours."""
    text = hlo_path.read_text()
    n_ll = text.count('custom_call_target="jmep_ll_')
    if n_ll == 0 or text.count(" custom-call(") != n_ll:
        return n_ll, 0
    comp, in_cb = None, 0
    for line in text.splitlines():  # HLO: computation headers are unindented lines ending "{"
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            comp = line
        elif comp is not None and "command_buffer" in comp.split("(")[0]:
            in_cb += line.count('custom_call_target="jmep_ll_')
    thunks = hlo_path.with_name(hlo_path.name.split(".sm_")[0] +
                                ".thunk_sequence_after_thunk_passes.txt")
    if thunks.exists():
        stack = []  # (indent, thunk kind) of the enclosing thunks
        for line in thunks.read_text().splitlines():
            m = re.match(r"^(\s*)\d+: (\w+)", line)
            if not m:
                continue
            indent, kind = len(m.group(1)), m.group(2)
            while stack and stack[-1][0] >= indent:
                stack.pop()
            if kind == "kCustomCall" and any(k == "kCommandBuffer" for _, k in stack):
                in_cb += 1
            stack.append((indent, kind))
    return n_ll, min(in_cb, n_ll)


@pytest.mark.parametrize("types", ["FUSION,CUSTOM_CALL", "FUSION,CUSTOM_CALL,WHILE,CONDITIONAL"])
def test_kernels_replay_inside_cuda_graphs(gpu_mesh, tmp_path, types):
    """With XLA command buffers on (custom calls captured into CUDA graphs, graphs of any
    size), the LL calls are captured and every replay still matches the reference: a
    step replayed with fresh data, and a loop of steps."""
    dump = tmp_path / "hlo"
    env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_PREALLOCATE="false",
               XLA_FLAGS=f"--xla_gpu_enable_command_buffer={types} "
                         f"--xla_gpu_graph_min_graph_size=1 --xla_dump_to={dump} "
                         "--xla_dump_hlo_as_text")
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d.local_hardware_id) for d in gpu_mesh.devices.flat)
    seed = int(np.random.default_rng().integers(1 << 30))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "_ll_worker.py"), "--mode",
                           "single", "--seed", str(seed), "--only", "graph_replay", "--steps",
                           "200"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    print(out[-3000:])
    assert proc.returncode == 0 and "PASS graph_replay" in proc.stdout, out[-4000:]
    modules = {f.name.split(".sm_")[0]: _ll_calls_in_graphs(f)
               for f in sorted(dump.glob("*gpu_after_optimizations.txt"))}
    modules = {k: v for k, v in modules.items() if v[0]}
    print(f"{types}: (LL custom calls, captured) per module: {modules}")
    assert modules and all(n == c for n, c in modules.values()), (
        f"{types}: LL custom calls left outside command buffers: {modules} "
        f"(dump in {dump})")


# ---------------------------------------------------------------- issue 16 on the kernels

@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_layers_share_one_buffer_on_gpu(gpu_mesh, scan):
    """Three MoE layers on one Buffer (a loop, then a lax.scan over stacked params):
    output and gradients equal the dense model's, as on CPU (test_shared_buffer.py)."""
    import _layers
    from test_shared_buffer import E, F, H, L, check_shared_buffer
    r = gpu_mesh.size
    n = 32 * r
    rng, seed = u.fresh_rng()
    layers = _layers.init_layers(jax.random.key(int(rng.integers(1 << 31))), L, H, F, E)
    x = jnp.asarray(rng.standard_normal((n, H)), jnp.bfloat16)
    c = jnp.asarray(rng.standard_normal((n, H)), jnp.float32)
    with ep.Buffer(ep.EPConfig(E, n // r, H), mesh=gpu_mesh, axis_name="ep") as buf:
        check_shared_buffer(gpu_mesh, buf, layers, x, c, seed, scan=scan)
        buf.check()


@pytest.mark.parametrize("use_fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("hook", [False, True], ids=["whole", "hook"])
def test_deepep_face_matches_plain_api_on_gpu(gpu_mesh, use_fp8, hook):
    """Buffer.low_latency_dispatch / combine (whole calls, or the split halves behind the
    receive hooks) give the plain API's results on the kernels: the same rows per
    (expert, source rank) block, counts, stats, and combined_x bit for bit."""
    import _deepep_steps as steps
    from jax_mscclpp_ep import testing
    r = gpu_mesh.size
    t, m, h, k, e = 24, 32, 512, 4, 8
    rng, seed = u.fresh_rng()
    x, idx, w = u.make_inputs(rng, r, t, h, k, e)
    stats = rng.integers(0, 100, (r, e // r)).astype(np.int32)
    with ep.Buffer(ep.EPConfig(e, m, h), mesh=gpu_mesh, axis_name="ep") as buf:
        got = u.shard_run(r, steps.deepep_step(buf, use_fp8, hook), x, idx, w, stats, mesh=gpu_mesh)
        want = u.shard_run(r, steps.plain_step(buf, use_fp8), x, idx, w, stats, mesh=gpu_mesh)
        buf.check()
    # The kernels claim row slots at run time: compare each rank's canonical form.
    for i in range(r):
        a, b = (testing.normalize_dispatch(o[0][i], o[1][i] if use_fp8 else None, o[2][i], o[3][i],
                                           o[4][i], m) for o in (got, want))
        for name, fa, fb in zip(testing.Canonical._fields, a, b):
            np.testing.assert_array_equal(np.asarray(fa).view(np.uint8), np.asarray(fb).view(np.uint8),
                                          f"seed {seed}: rank {i} {name}")
    np.testing.assert_array_equal(got[5], want[5], f"seed {seed}: stats")
    np.testing.assert_array_equal(got[6].view(np.uint16), want[6].view(np.uint16),
                                  f"seed {seed}: combined_x")


def test_gpus_can_run_the_compiled_kernels(gpu_mesh):
    """The architecture probe behind Buffer(...): every GPU here loads the kernels."""
    from jax_mscclpp_ep import native
    for d in gpu_mesh.devices.flat:
        assert native.ext.kernel_image_error(d.local_hardware_id) == ""
        assert native.ext.compute_capability(d.local_hardware_id) == str(d.compute_capability)
    print("compiled for", native.ext.cuda_archs())
