"""Channel layer on real GPUs: memory and port channels, in both process
modes (one process driving both GPUs; one process per GPU bootstrapped
through jax.distributed's key-value store). The checks live in
tests/_channels_worker.py; each mode runs in fresh processes.
"""

import os
import shutil
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu

WORKER = os.path.join(os.path.dirname(__file__), "_channels_worker.py")
TIMEOUT_S = int(os.environ.get("JMEP_CHANNELS_TEST_TIMEOUT", "600"))


def _skip_reason():
    from jax_mscclpp_ep import native
    if not native.cuda_enabled() or not hasattr(native.ext, "Communicator"):
        return "jax_mscclpp_ep was built without the CUDA channel layer"
    if shutil.which("nvidia-smi") is None:
        return "no GPU driver"
    if native.ext.device_count() < 2:
        return "needs 2 GPUs"
    return None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env.update(NCCL_NVLS_ENABLE="0", XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)  # every rank must see both GPUs (CUDA IPC)
    env.pop("JMEP_FORCE_PORT_CHANNELS", None)  # the worker picks the channel kind itself
    return env


def _check(outs):
    for rc, out in outs:
        print(out)
    for rc, out in outs:
        assert rc == 0 and "failed=0" in out, out[-4000:]


def test_channels_single_process():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    seed = int.from_bytes(os.urandom(4), "little")
    p = subprocess.run([sys.executable, WORKER, "--mode", "single", "--seed", str(seed)],
                       capture_output=True, text=True, timeout=TIMEOUT_S, env=_env())
    _check([(p.returncode, p.stdout + p.stderr)])


def test_channels_two_processes():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    seed, port = int.from_bytes(os.urandom(4), "little"), _free_port()
    _check(_run_ranks([[sys.executable, WORKER, "--mode", "multi", "--rank", str(r), "--nproc",
                        "2", "--port", str(port), "--seed", str(seed)] for r in range(2)], _env()))


def _run_ranks(cmds, env):
    """[(exit code, output)] of one process per command, run together."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env) for c in cmds]
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        outs.append((p.returncode, out))
    return outs


def test_channels_two_simulated_hosts_one_gpu():
    """Two processes on GPU 0 with their own JMEP_HOST_ID: the channel checks (puts at odd
    offsets, 10,000-round put->signal ordering... fewer on a shared GPU, concurrent atomics
    with back-pressure, flush, barriers, 50 create/destroy cycles, silent peer) through
    UCX port channels over TCP loopback."""
    from jax_mscclpp_ep import native, ucx
    if not native.cuda_enabled() or shutil.which("nvidia-smi") is None:
        pytest.skip("needs the CUDA channel layer and a GPU")
    if not ucx.available():
        pytest.skip("the UCX connection library is not available")
    seed, port = int.from_bytes(os.urandom(4), "little"), _free_port()
    env = dict(_env(), UCX_TLS=os.environ.get("JMEP_TEST_UCX_TLS", "tcp,cuda_copy"),
               JMEP_TIMEOUT_S="20")
    _check(_run_ranks([[sys.executable, WORKER, "--mode", "multi", "--rank", str(r), "--nproc",
                        "2", "--port", str(port), "--seed", str(seed), "--devices", "0,0",
                        "--host-id", f"simhost{r}"] for r in range(2)], env))
