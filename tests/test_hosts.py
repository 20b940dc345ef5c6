"""Host identities and the UCX switch, on CPU: which id a process gets, how bad ids and
settings are refused, and that nothing loads UCX until a peer sits on another host."""

import os
import subprocess
import sys

import pytest

import jax_mscclpp_ep as ep
from jax_mscclpp_ep import channels, ucx
from _ep_util import mesh_of

CONFIG = ep.EPConfig(num_experts=8, max_tokens_per_rank=4, hidden=128)


def test_host_id_precedence(monkeypatch):
    monkeypatch.delenv("JMEP_HOST_ID", raising=False)
    default = channels.resolve_host_id()
    assert default == channels.default_host_id() and "/" in default
    monkeypatch.setenv("JMEP_HOST_ID", "rack3-node7")
    assert channels.resolve_host_id() == "rack3-node7"
    assert channels.resolve_host_id("sim-a") == "sim-a"  # the argument wins over the env
    monkeypatch.setenv("JMEP_HOST_ID", "  ")
    assert channels.resolve_host_id() == default          # blank: the default


def test_host_id_too_long_is_refused():
    with pytest.raises(ValueError, match="at most 127 bytes"):
        channels.resolve_host_id("h" * 128)


@pytest.mark.parametrize("bad", ["", "x" * 200, 7])
def test_buffer_host_id_validated(bad):
    with pytest.raises(ValueError, match="host_id must be a non-empty string"):
        ep.Buffer(CONFIG, mesh=mesh_of(2), host_id=bad)


def test_buffer_keeps_host_id_on_cpu():
    with ep.Buffer(CONFIG, mesh=mesh_of(2), host_id="sim-b") as buf:
        assert buf.host_id == "sim-b"
        assert buf.peer_channels() is None  # CPU buffers have no channels


def test_ucx_signal_mode_setting(monkeypatch):
    monkeypatch.delenv("JMEP_UCX_SIGNALS", raising=False)
    assert channels.ucx_signal_mode() == ucx.SIGNALS_AM
    monkeypatch.setenv("JMEP_UCX_SIGNALS", "RMA")
    assert channels.ucx_signal_mode() == ucx.SIGNALS_RMA
    monkeypatch.setenv("JMEP_UCX_SIGNALS", "ib")
    with pytest.raises(ValueError, match="JMEP_UCX_SIGNALS must be 'am' or 'rma'"):
        channels.ucx_signal_mode()


def test_ucx_library_path_override(monkeypatch):
    monkeypatch.setenv("JMEP_UCX_LIBRARY", "/somewhere/libjmep_ucx.so")
    assert ucx.library_path() == "/somewhere/libjmep_ucx.so"
    monkeypatch.delenv("JMEP_UCX_LIBRARY")
    assert ucx.library_path().endswith(os.path.join("jax_mscclpp_ep", ucx.LIB_NAME))


def test_missing_library_gives_install_hint(tmp_path):
    """A process whose UCX connection library is missing gets an error naming the fix."""
    code = ("from jax_mscclpp_ep import ucx\n"
            "try:\n    ucx.load()\nexcept ucx.UcxUnavailableError as e:\n    print(e)\n")
    env = dict(os.environ, JMEP_UCX_LIBRARY=str(tmp_path / "nothing.so"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120).stdout
    assert "the UCX connection is unavailable" in out and "jax_mscclpp_ep[ucx]" in out, out


def test_single_host_use_loads_no_ucx():
    """Importing the package and running dispatch/combine never maps libucp."""
    code = ("import jax, jax.numpy as jnp, numpy as np\n"
            "import jax_mscclpp_ep as ep\n"
            "cfg = ep.EPConfig(num_experts=4, max_tokens_per_rank=4, hidden=128)\n"
            "x = jnp.ones((4, 128), jnp.bfloat16); idx = jnp.array(np.arange(8).reshape(4, 2) % 4, jnp.int32)\n"
            "res = ep.dispatch(x, idx, cfg, axis_name=None)\n"
            "jax.block_until_ready(res.recv_x)\n"
            "maps = open('/proc/self/maps').read()\n"
            "print('UCX LOADED' if 'libucp' in maps or 'libjmep_ucx' in maps else 'NO UCX')\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert "NO UCX" in proc.stdout, proc.stdout + proc.stderr[-3000:]
