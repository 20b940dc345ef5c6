"""Start one process per rank on this machine, for jax.distributed on 127.0.0.1 (examples).

run_ranks(script, nprocs, args) starts `script` nprocs times with --rank=i --port=P
--seed=S appended (one coordinator port, one seed shared by all) and returns their exit
codes, or None after killing them all when they outlast the timeout.
"""

import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env() -> dict:
    """This environment for a rank: unbuffered, no NVLink multicast, no preallocated GPU
    memory (ranks may share a GPU), and without a virtual CPU device count (one device a
    process)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", NCCL_NVLS_ENABLE="0",
               XLA_PYTHON_CLIENT_PREALLOCATE="false")
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "host_platform_device_count" not in f)
    return env


def run_ranks(script, nprocs, args, timeout, env_of=lambda i, env: env):
    port, seed = free_port(), int.from_bytes(os.urandom(4), "little")
    env = rank_env()
    procs = [subprocess.Popen([sys.executable, os.path.abspath(script), *args, f"--rank={i}",
                               f"--port={port}", f"--seed={seed}"], env=env_of(i, env))
             for i in range(nprocs)]
    try:
        return [p.wait(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        return None


def init_rank(a, local_device_ids=None, **kw):
    """In a rank process (a.gpu, a.port, a.nprocs, a.rank from the command line): JAX on
    CPU devices (gloo between processes) unless a.gpu, then jax.distributed. Returns jax."""
    if not a.gpu:
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    if not a.gpu:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{a.port}", num_processes=a.nprocs,
                               process_id=a.rank,
                               local_device_ids=local_device_ids if a.gpu else None, **kw)
    return jax
