"""LL dispatch/combine kernels on real GPUs against the pure-JAX reference.

Each test starts fresh worker processes (tests/_ll_worker.py) so that both
process modes run: one process driving every GPU, and one process per GPU
(jax.distributed on 127.0.0.1, both GPUs visible to each rank). Both channel
paths run: memory channels (NVLink) and forced port channels (proxy).
Fresh random data every run; the seed is printed on failure.
"""

import os
import shutil
import socket
import subprocess
import sys

import pytest

import jax_mscclpp_ep as ep

pytestmark = pytest.mark.gpu

WORKER = os.path.join(os.path.dirname(__file__), "_ll_worker.py")
TIMEOUT_S = int(os.environ.get("JMEP_LL_TEST_TIMEOUT", "900"))
# The forced-port path is slow (one proxy operation per message): by default it
# skips the large-shape cases and runs a shorter loop; JMEP_LL_PORT_FULL=1 runs all.
PORT_ARGS = [] if os.environ.get("JMEP_LL_PORT_FULL") else ["--quick", "--steps", "200"]


def _gpu_count() -> int:
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except Exception:  # noqa: BLE001
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def _ll_built() -> bool:
    return ep.cuda_enabled()  # a CUDA build has the kernels and the channel layer


def _has_channels() -> bool:
    return ep.cuda_enabled()


def _skip_reason(needs_channels=True, gpus=2):
    if not _ll_built():
        return "jax_mscclpp_ep was built without the CUDA LL kernels"
    if needs_channels and not _has_channels():
        return "built without the channel layer (communicators / port channels)"
    if _gpu_count() < gpus:
        return f"needs {gpus} GPU{'s' if gpus > 1 else ''}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra=None):
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)  # every rank must see both GPUs (CUDA IPC)
    env.update(extra or {})
    env.update(XLA_PYTHON_CLIENT_PREALLOCATE="false", NCCL_NVLS_ENABLE="0", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)             # no virtual CPU devices in the workers
    return env


def _run(cmds, env=None, name="ll"):
    """Run the workers; their output goes straight to files (JMEP_LL_LOG_DIR, else a
    temporary folder) so that it survives a killed run."""
    import tempfile
    log_dir = os.environ.get("JMEP_LL_LOG_DIR") or tempfile.mkdtemp(prefix="jmep_ll_")
    os.makedirs(log_dir, exist_ok=True)
    paths = [os.path.join(log_dir, f"{name}_{i}.log") for i in range(len(cmds))]
    files = [open(p, "w") for p in paths]
    procs = [subprocess.Popen(c, env=_env(env), stdout=f, stderr=subprocess.STDOUT, text=True)
             for c, f in zip(cmds, files)]
    import time
    deadline = time.monotonic() + TIMEOUT_S  # one limit for the whole group
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for f in files:
        f.close()
    outs = []
    for p in paths:
        with open(p) as f:
            outs.append(f.read())
    for out in outs:
        print(out)
    codes = [p.returncode for p in procs]
    assert all(c == 0 for c in codes), f"worker exit codes {codes}; tails:\n" + "\n".join(
        o[-4000:] for o in outs)
    return outs


@pytest.mark.parametrize("path", ["mem", "port", "p2p"])
def test_ll_single_process(path):
    """p2p: the kernels over direct CUDA peer access, without the channel layer."""
    if (why := _skip_reason(needs_channels=path != "p2p")) is not None:
        pytest.skip(why)
    seed = int.from_bytes(os.urandom(4), "little")
    cmd = [sys.executable, WORKER, "--mode", "single", "--seed", str(seed)]
    _run([cmd + (["--force-port"] + PORT_ARGS if path == "port" else [])],
         env={"JMEP_LL_P2P": "1"} if path == "p2p" else None, name=f"single_{path}")


@pytest.mark.parametrize("path", ["mem", "port"])
def test_ll_two_processes(path):
    if (why := _skip_reason()) is not None:
        pytest.skip(why)
    seed = int.from_bytes(os.urandom(4), "little")
    port = _free_port()
    cmds = []
    for pid in range(2):
        # The large shapes run in the single-process tests (same kernels); here the
        # point is the cross-process bootstrap (CUDA IPC, KV store), so --quick.
        c = [sys.executable, WORKER, "--mode", "multi", "--pid", str(pid), "--port", str(port),
             "--seed", str(seed), "--quick"]
        cmds.append(c + (["--force-port", "--steps", "200"] if path == "port" else []))
    _run(cmds, name=f"multi_{path}")


@pytest.mark.parametrize("path", ["mem", "port"])
def test_ll_one_gpu_one_rank(path):
    """R = 1 on one GPU: every token is local (the kernels' self path), under jit,
    shard_map, vmap and the 1,000-step loop."""
    if (why := _skip_reason(gpus=1)) is not None:
        pytest.skip(why)
    seed = int.from_bytes(os.urandom(4), "little")
    cmd = [sys.executable, WORKER, "--mode", "single", "--seed", str(seed)]
    _run([cmd + (["--force-port"] if path == "port" else [])],
         env={"CUDA_VISIBLE_DEVICES": "0"}, name=f"one_rank_{path}")


@pytest.mark.parametrize("path", ["mem", "port"])
def test_ll_two_processes_one_gpu(path):
    """Two ranks, one process each, sharing GPU 0: the cross-process path (KV store
    bootstrap, CUDA IPC, both channel kinds, counts, timeouts) where only one GPU
    is at hand. Kernels of two processes on one GPU time-slice, so it is slow:
    small cases and a short loop."""
    if (why := _skip_reason(gpus=1)) is not None:
        pytest.skip(why)
    seed = int.from_bytes(os.urandom(4), "little")
    port = _free_port()
    cmds = [[sys.executable, WORKER, "--mode", "multi", "--pid", str(pid), "--gpu", "0",
             "--port", str(port), "--seed", str(seed), "--quick", "--steps", "50"]
            + (["--force-port"] if path == "port" else []) for pid in range(2)]
    _run(cmds, name=f"one_gpu_multi_{path}")


@pytest.mark.parametrize("path", ["mem", "port", "ucx"])
@pytest.mark.parametrize("share", ["two_gpus", "one_gpu"])
def test_ll_dead_peer_reported(path, share):
    """Rank 1 exits mid-loop: rank 0 reports a timeout (or, over UCX, the lost endpoint)
    naming peer 1 within timeout + a few seconds, and later calls on that Buffer fail at
    once with the same message. ucx: the two processes act as two hosts."""
    if (why := _skip_reason(gpus=2 if share == "two_gpus" else 1)) is not None:
        pytest.skip(why)
    if path == "ucx" and (why := _ucx_skip_reason()) is not None:
        pytest.skip(why)
    seed, port = int.from_bytes(os.urandom(4), "little"), _free_port()
    cmds = [[sys.executable, WORKER, "--mode", "multi", "--pid", str(pid), "--port", str(port),
             "--seed", str(seed), "--only", "dead_peer"]
            + (["--gpu", "0"] if share == "one_gpu" else [])
            + (["--ranks-per-host", "1"] if path == "ucx" else [])
            + (["--force-port"] if path == "port" else []) for pid in range(2)]
    _run(cmds, env=UCX_ENV if path == "ucx" else None, name=f"dead_peer_{share}_{path}")


# ---------------------------------------------------------------- several hosts, simulated
# Processes on GPU 0 given their own JMEP_HOST_ID act as separate hosts: peers on
# another "host" are UCX port channels over TCP loopback (cuda_copy stages GPU memory),
# peers on the same one keep memory channels. "2x1": two hosts of one rank; "2x2": two
# hosts of two ranks each (mixed memory/UCX channels in one EP group).
UCX_ENV = {"UCX_TLS": os.environ.get("JMEP_TEST_UCX_TLS", "tcp,cuda_copy"),
           "UCX_WARN_UNUSED_ENV_VARS": "n"}
HOST_LAYOUTS = {"2x1": (2, 1), "2x2": (4, 2)}  # (processes, ranks per host)


def _ucx_skip_reason():
    from jax_mscclpp_ep import ucx
    if not ucx.available():
        if os.environ.get("JMEP_EXPECT_UCX"):
            pytest.fail("JMEP_EXPECT_UCX is set but the UCX connection is unavailable")
        return "the UCX connection library (jax_mscclpp_ep[ucx]) is not available"
    return None


def _host_cmds(layout, extra, seed=None):
    nproc, per_host = HOST_LAYOUTS[layout]
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    port = _free_port()
    return [[sys.executable, WORKER, "--mode", "multi", "--pid", str(pid), "--nproc", str(nproc),
             "--gpu", "0", "--port", str(port), "--seed", str(seed), "--ranks-per-host",
             str(per_host), *extra] for pid in range(nproc)]


@pytest.mark.parametrize("layout", sorted(HOST_LAYOUTS))
def test_ll_simulated_hosts_one_gpu(layout):
    """Every LL case (bf16/fp8, round_scale, masks, duplicates and bad ids, split
    halves, gradients, vmap, the 1,000-step loop, ...) across simulated hosts."""
    if (why := _skip_reason(gpus=1) or _ucx_skip_reason()) is not None:
        pytest.skip(why)
    steps = os.environ.get("JMEP_UCX_STEPS", "1000")
    _run(_host_cmds(layout, ["--quick", "--steps", steps]), env=UCX_ENV, name=f"hosts_{layout}")


@pytest.mark.parametrize("layout", sorted(HOST_LAYOUTS))
def test_ll_simulated_hosts_fresh_routing(layout):
    """1,000 steps with fresh random routing every step over UCX, checked every 250."""
    if (why := _skip_reason(gpus=1) or _ucx_skip_reason()) is not None:
        pytest.skip(why)
    _run(_host_cmds(layout, ["--only", "long_run", "--steps", "1000", "--chunk", "250"]),
         env=UCX_ENV, name=f"hosts_long_{layout}")


@pytest.mark.parametrize("layout", sorted(HOST_LAYOUTS))
def test_ll_simulated_hosts_cuda_graphs(layout):
    """The LL calls under XLA command buffers (CUDA graphs), replayed with fresh data and in
    a jitted loop, over UCX (tests/test_gpu_one.py checks from the HLO dump that such
    calls are captured)."""
    if (why := _skip_reason(gpus=1) or _ucx_skip_reason()) is not None:
        pytest.skip(why)
    env = dict(UCX_ENV, XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL "
                                  "--xla_gpu_graph_min_graph_size=1")
    _run(_host_cmds(layout, ["--only", "graph_replay", "--steps", "200"]), env=env,
         name=f"hosts_graphs_{layout}")


# (mode, GPUs needed, steps): one process per rank unless "single"; "one_gpu" modes put
# both ranks' processes on GPU 0 (time-sliced, hence fewer steps).
LONG_MODES = {
    "two_gpus_single": (2, 100_000), "two_gpus_multi": (2, 100_000),
    "one_rank": (1, 100_000), "one_gpu_multi": (1, 10_000),
}


def _mode_cmds(mode, extra):
    seed, port = int.from_bytes(os.urandom(4), "little"), _free_port()
    if mode in ("two_gpus_single", "one_rank"):
        return [[sys.executable, WORKER, "--mode", "single", "--seed", str(seed), *extra]], (
            {"CUDA_VISIBLE_DEVICES": "0"} if mode == "one_rank" else None)
    gpu = ["--gpu", "0"] if mode == "one_gpu_multi" else []
    return [[sys.executable, WORKER, "--mode", "multi", "--pid", str(pid), "--port", str(port),
             "--seed", str(seed), *gpu, *extra] for pid in range(2)], None


@pytest.mark.slow
@pytest.mark.parametrize("path", ["mem", "port"])
@pytest.mark.parametrize("mode", sorted(LONG_MODES))
def test_ll_long_run(mode, path):
    """Fresh random routing every step (random live tokens, masks, hot experts), the last
    step of every 1,000 checked against the reference, no drift in memory/threads/fds."""
    gpus, steps = LONG_MODES[mode]
    if (why := _skip_reason(gpus=gpus)) is not None:
        pytest.skip(why)
    steps = int(os.environ.get("JMEP_LONG_STEPS", steps))
    extra = ["--only", "long_run", "--steps", str(steps), "--chunk", str(min(1000, steps))]
    cmds, env = _mode_cmds(mode, extra + (["--force-port"] if path == "port" else []))
    _run(cmds, env=env, name=f"long_{mode}_{path}")


@pytest.mark.slow
@pytest.mark.parametrize("path", ["mem", "port"])
@pytest.mark.parametrize("mode", ["one_rank", "one_gpu_multi", "two_gpus_multi"])
def test_ll_create_destroy_100_buffers(mode, path):
    if (why := _skip_reason(gpus=LONG_MODES[mode][0])) is not None:
        pytest.skip(why)
    extra = ["--only", "create_destroy", "--steps", "100"]
    cmds, env = _mode_cmds(mode, extra + (["--force-port"] if path == "port" else []))
    _run(cmds, env=env, name=f"create_destroy_{mode}_{path}")


@pytest.mark.parametrize("path", ["mem", "port"])
@pytest.mark.parametrize("mode", ["one_rank", "one_gpu_multi", "two_gpus_multi"])
def test_ll_exit_without_close_is_clean(mode, path):
    """Buffers left open are closed at interpreter exit: exit code 0, no traceback."""
    if (why := _skip_reason(gpus=LONG_MODES[mode][0])) is not None:
        pytest.skip(why)
    extra = ["--only", "exit_without_close"] + (["--force-port"] if path == "port" else [])
    cmds, env = _mode_cmds(mode, extra)
    outs = _run(cmds, env=env, name=f"exit_{mode}_{path}")
    for out in outs:
        assert "Traceback" not in out and "RuntimeWarning" not in out, out[-3000:]


def test_ll_size_hint_matches_config():
    if not _ll_built():
        pytest.skip("no CUDA LL build")
    from jax_mscclpp_ep import native
    for (m, h, r, e) in [(128, 7168, 2, 256), (1, 128, 1, 1), (1024, 8192, 8, 1024), (37, 5120, 4, 64)]:
        assert native.ext.ll_size_hint(m, h, r, e) == ep.size_hint(m, h, r, e)


@pytest.mark.parametrize("case", ["create_destroy", "exit_without_close"])
def test_ll_simulated_hosts_lifecycle(case):
    """Over UCX: 100 Buffers created, used and closed without drift in GPU memory, threads
    or fds; Buffers left open are closed at exit without a traceback or warning."""
    if (why := _skip_reason(gpus=1) or _ucx_skip_reason()) is not None:
        pytest.skip(why)
    extra = ["--only", case] + (["--steps", "100"] if case == "create_destroy" else [])
    outs = _run(_host_cmds("2x1", extra), env=UCX_ENV, name=f"hosts_{case}")
    for out in outs:
        assert "Traceback" not in out and "RuntimeWarning" not in out, out[-3000:]
