"""The compiled module: present, reporting its build, agreeing with the Python layout."""

import os

import pytest

import jax_mscclpp_ep as ep
from jax_mscclpp_ep import native


def test_import_and_version():
    assert ep.__version__ == "0.1.0"
    if native.ext is None:
        pytest.skip("installed without the native module")
    assert ep.native_version() == ep.__version__


@pytest.mark.skipif(os.environ.get("JMEP_EXPECT_CUDA") != "1",
                    reason="set JMEP_EXPECT_CUDA=1 where the CUDA part must be compiled in (CI)")
def test_cuda_part_compiled():
    assert native.ext is not None, "the native module did not build"
    assert ep.cuda_enabled(), "the native module was built without its CUDA part"


def test_size_hint_matches_native_layout():
    if not ep.cuda_enabled() or not hasattr(native.ext, "ll_size_hint"):
        pytest.skip("no CUDA build with the LL layout")
    for m, h, r, e in [(128, 7168, 2, 256), (64, 4096, 8, 64), (1, 128, 1, 1), (1024, 8192, 4, 1024)]:
        assert native.ext.ll_size_hint(m, h, r, e) == ep.size_hint(m, h, r, e)


def test_ll_grid_leaves_port_peers_an_sm():
    """One block per SM up to the cap; with a port peer one SM stays free for the
    proxy's work on the GPU (the LL kernels spin on what it delivers)."""
    if not ep.cuda_enabled() or not hasattr(native.ext, "ll_grid_blocks"):
        pytest.skip("no CUDA build with the LL kernels")
    grid = native.ext.ll_grid_blocks
    for sms in (1, 2, 108, 114, 132, 148):  # e.g. A100, H100 PCIe, H100 SXM / H200, B200
        assert grid(sms, False) == sms
        assert grid(sms, True) == max(sms - 1, 1)
    # kLlMaxBlocks: each block keeps its own seq word in the device state.
    assert grid(300, False) == 256 and grid(300, True) == 255


DEFAULT_ARCHS = "80-real,90-real,100-real,120-real,120-virtual"


@pytest.mark.skipif(os.environ.get("JMEP_EXPECT_CUDA") != "1" or os.environ.get("JMEP_CUDA_ARCHS"),
                    reason="CI builds the default architecture list")
def test_default_architectures_compiled():
    assert native.ext.cuda_archs() == DEFAULT_ARCHS


def test_gpu_without_kernel_image_is_named_with_the_fix():
    from jax_mscclpp_ep import arch
    assert arch.arch_error("GPU 0 (Tesla T4)", "9.0", "", DEFAULT_ARCHS) is None
    msg = arch.arch_error("GPU 0 (Tesla T4)", "7.5", "no kernel image is available for execution "
                          "on the device", DEFAULT_ARCHS.replace(",", ";"))
    assert msg.startswith("jax_mscclpp_ep: GPU 0 (Tesla T4) (compute capability 7.5) cannot run")
    assert "80-real;90-real" in msg and "JMEP_CUDA_ARCHS=75 pip install" in msg
    assert "JMEP_CUDA_ARCHS=native" in arch.arch_error("GPU 1 (x)", "?", "unknown error", "90")


def test_source_tree_import_says_so():
    """Python run in the repository root imports the source tree (no compiled module):
    where CUDA is expected, the import warns and says what to do."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if any(f.startswith("_ep") for f in os.listdir(os.path.join(root, "jax_mscclpp_ep"))):
        pytest.skip("an in-place build put the compiled module into the source tree")
    env = dict(os.environ, JMEP_EXPECT_CUDA="1", PYTHONWARNINGS="default")
    env.pop("PYTHONPATH", None)
    code = "import jax_mscclpp_ep as e, jax_mscclpp_ep.native as n; print(n.no_cuda_message())"
    p = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    want = f"you are importing the source tree at {os.path.join(root, 'jax_mscclpp_ep')}"
    assert want in p.stderr and "pip install ." in p.stderr, p.stderr
    assert want in p.stdout  # also the reason a GPU Buffer gives


def test_kernel_limits_match_config():
    """ffi/kernels/ll_limits.h and config.py state the same limits (any build)."""
    if native.ext is None:
        pytest.skip("installed without the native module")
    from jax_mscclpp_ep import config
    limits = native.ext.ll_limits()
    assert limits == {name: getattr(config, name) for name in limits}
    assert {"MAX_TOPK", "MAX_EXPERTS", "MAX_TOKENS_PER_RANK", "GPU_MAX_HIDDEN"} <= set(limits)


def _cuda_ep():
    if not ep.cuda_enabled():
        pytest.skip("no CUDA build")
    return native.ext


def test_ll_attribute_contract():
    """Every LL handler takes these attributes, in this order (ffi/handlers/ll_attrs.h);
    the lowering builds its attribute dict from this list."""
    assert _cuda_ep().ll_attributes() == [
        ("buffer_id", "i64"), ("num_experts", "i64"), ("max_tokens", "i64"),
        ("use_fp8", "bool"), ("round_scale", "bool"), ("phases", "i64")]


def test_ffi_targets_are_instantiate_execute_bundles():
    targets = _cuda_ep().ffi_targets()
    assert [name for name, _ in targets] == [
        "jmep_ll_dispatch", "jmep_ll_combine", "jmep_ll_dispatch_send", "jmep_ll_combine_send",
        "jmep_ll_scatter_rows", "jmep_ll_gather_rows", "jmep_ll_alive"]
    for _, bundle in targets:
        assert sorted(bundle) == ["execute", "instantiate"]


def test_instantiate_stage_refuses_an_unknown_buffer_at_compile_time():
    """The real handler bundle, registered on the CPU platform under another name: XLA
    runs the instantiate stage when it compiles the call (decoding every attribute,
    the booleans as bool) and it names the Buffer id it has no state for. Nothing runs."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    name, bundle = _cuda_ep().ffi_targets()[3]  # combine_send: no output shape rules
    jax.ffi.register_ffi_target("test_native_" + name, bundle, platform="cpu")
    attrs = dict(buffer_id=np.int64(987654), num_experts=np.int64(8), max_tokens=np.int64(16),
                 use_fp8=False, round_scale=True, phases=np.int64(3))
    call = jax.ffi.ffi_call("test_native_" + name, jax.ShapeDtypeStruct((1,), jnp.int32))
    f = jax.jit(lambda y, i: call(y, i, i, i, **attrs))
    with pytest.raises(Exception, match="no LL state for Buffer id 987654"):
        f(jnp.zeros((2, 2), jnp.bfloat16), jnp.zeros((1,), jnp.int32))


def test_channel_test_kernels_live_in_the_test_only_module():
    """Communicator has no test/bench launches; _ep_testing has them, takes _ep's
    Communicator, and the package never imports it."""
    import subprocess
    import sys
    e = _cuda_ep()
    assert not [a for a in dir(e.Communicator) if a.startswith(("test_", "bench_", "scratch"))]
    from jax_mscclpp_ep import _ep_testing
    assert "comm: jax_mscclpp_ep._ep.Communicator" in _ep_testing.test_put.__doc__
    code = ("import sys, jax_mscclpp_ep, jax_mscclpp_ep.buffer, jax_mscclpp_ep.gpu; "
            "print('jax_mscclpp_ep._ep_testing' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "False"
