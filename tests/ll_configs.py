"""Every configuration the LL cases (tests/multiprocess/) run in: how many processes,
which GPU each drives, memory or forced port channels, simulated hosts over UCX,
which cases and how many steps. tests/test_ll_gpu.py reports each (configuration,
case); tests/ll_run.py runs one configuration from the shell."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess

from mp_env import RankSettings
from mp_launch import CASES_DIR, Launch, list_cases
from mp_parent import short_id

MAIN = ("ll_cases.py", "ll_grad_cases.py")
LIFE = ("ll_life_cases.py",)
MASK = ("ll_mask_cases.py",)
# The forced-port path is slow (one proxy operation per message): by default it skips
# the large shapes and runs a shorter loop; JMEP_LL_PORT_FULL=1 runs everything.
PORT_FULL = bool(os.environ.get("JMEP_LL_PORT_FULL"))
UCX_ENV = (("UCX_TLS", os.environ.get("JMEP_TEST_UCX_TLS", "tcp,cuda_copy")),
           ("UCX_WARN_UNUSED_ENV_VARS", "n"))
GRAPH_FLAGS = "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"


@dataclasses.dataclass(frozen=True)
class LLConfig:
    name: str
    files: tuple = MAIN
    nproc: int = 0                # processes; 0: one process holding every rank
    gpus: int = 2                 # GPUs the machine needs
    gpu: int | None = None        # the one GPU every process drives (ranks sharing it)
    force_port: bool = False
    ranks_per_host: int = 0       # > 0: simulated hosts of this many ranks (UCX between)
    quick: bool = False           # leave out the cases marked `large`
    only: tuple = ()              # case functions (without "test_") to keep; () = all
    steps: int = 1000
    chunk: int = 1000
    env: tuple = ()
    ucx: bool = False             # needs the UCX connection library
    slow: bool = False
    clean_exit: bool = False      # no traceback / RuntimeWarning in any rank's log
    platform: str = "gpu"
    seed: int = 0                 # 0: a fresh one per run
    heartbeat_s: int = 0          # jax.distributed heartbeat timeout (0: jax's 100 s)
    dies: tuple = ()              # ranks that kill themselves on purpose (SIGKILL)
    known_failure: str = ""       # why it may fail (not shown passing): xfail, not strict

    def selects(self, case: dict) -> bool:
        """only names a case function (all its parameters: "step"), one case ("step-basic_bf16")
        or a parameter id ("basic_bf16", the worker's old case names)."""
        name = case["case"].split("::")[1]
        func, param = name.split("[")[0][len("test_"):], name.partition("[")[2].rstrip("]")
        return (case["case"].split("::")[0] in self.files
                and not (self.quick and "large" in case["marks"])
                and (not self.only or bool({func, param, short_id(case["case"])} & set(self.only))))

    def launch(self, targets=None, pytest_args=(), wrap="") -> Launch:
        s = RankSettings(platform=self.platform, device=self.gpu, force_port=self.force_port,
                         ranks_per_host=self.ranks_per_host, steps=self.steps, chunk=self.chunk,
                         seed=self.seed, heartbeat_s=self.heartbeat_s)
        if targets is None:  # every case this configuration selects, by node id
            targets = [os.path.join(CASES_DIR, c["case"])
                       for c in list_cases(self.files, self.platform) if self.selects(c)]
        return Launch(self.name, list(targets), s, nproc=self.nproc, env=dict(self.env),
                      pytest_args=list(pytest_args), wrap=wrap, may_die=self.dies)

    def skip_reason(self):
        if self.platform == "cpu":
            return None
        return gpu_skip_reason(self.gpus) or (ucx_skip_reason() if self.ucx else None)


def gpu_count() -> int:
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except Exception:  # noqa: BLE001 - no usable driver is "no GPUs"
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def ll_built() -> bool:
    import jax_mscclpp_ep as ep
    return ep.cuda_enabled()  # a CUDA build has the kernels and the channel layer


def gpu_skip_reason(gpus):
    if not ll_built():
        return "jax_mscclpp_ep was built without the CUDA LL kernels"
    if gpu_count() < gpus:
        return f"needs {gpus} GPU{'s' if gpus > 1 else ''}"
    return None


def ucx_skip_reason():
    from jax_mscclpp_ep import ucx
    if ucx.available():
        return None
    if os.environ.get("JMEP_EXPECT_UCX"):
        return "FAIL: JMEP_EXPECT_UCX is set but the UCX connection is unavailable"
    return "the UCX connection library (jax_mscclpp_ep[ucx]) is not available"


def paths(base: LLConfig, **port):
    """The memory-channel configuration and its forced-port twin."""
    return [dataclasses.replace(base, name=base.name + "-mem"),
            dataclasses.replace(base, name=base.name + "-port", force_port=True, **port)]


PORT_QUICK = {} if PORT_FULL else {"quick": True, "steps": 200}
# Process modes of the lifecycle configurations: (processes, GPUs needed, shared GPU).
MODES = {"one_rank": (0, 1, None), "one_gpu_multi": (2, 1, 0), "two_gpus_multi": (2, 2, None),
         "two_gpus_single": (0, 2, None)}
LONG_STEPS = {"two_gpus_single": 100_000, "two_gpus_multi": 100_000, "one_rank": 100_000,
              "one_gpu_multi": 10_000}
HOSTS = {"2x1": (2, 1), "2x2": (4, 2)}  # (processes, ranks per simulated host), all on GPU 0


def mode(name, mode_name, **kw):
    nproc, gpus, gpu = MODES[mode_name]
    env = (("CUDA_VISIBLE_DEVICES", "0"),) if mode_name == "one_rank" else ()
    return LLConfig(f"{name}-{mode_name}", nproc=nproc, gpus=gpus, gpu=gpu, env=env, **kw)


def hosts(name, layout, **kw):
    nproc, per_host = HOSTS[layout]
    env = UCX_ENV + tuple(kw.pop("env", ()))
    return LLConfig(f"{name}-{layout}", nproc=nproc, gpus=1, gpu=0, ranks_per_host=per_host,
                    ucx=True, env=env, **kw)


def gpu_configs():
    out = []
    out += paths(LLConfig("single_process"), **PORT_QUICK)
    out.append(LLConfig("single_process-p2p", env=(("JMEP_LL_P2P", "1"),)))
    # The large shapes run in one process (same kernels); across processes the point is
    # the bootstrap (CUDA IPC, key-value store), so quick.
    out += paths(LLConfig("two_processes", nproc=2, quick=True), steps=200)
    # R = 1 on one GPU: every token is local (the kernels' self path), every case.
    out += paths(LLConfig("one_gpu_one_rank", gpus=1, env=(("CUDA_VISIBLE_DEVICES", "0"),)))
    # Two processes time-slicing GPU 0: small cases and a short loop.
    out += paths(LLConfig("two_processes_one_gpu", nproc=2, gpus=1, gpu=0, quick=True, steps=50))
    for share in ("two_gpus", "one_gpu"):
        for path in ("mem", "port", "ucx"):
            out.append(LLConfig(
                f"dead_peer-{share}-{path}", files=LIFE, only=("dead_peer",), nproc=2,
                gpus=2 if share == "two_gpus" else 1, gpu=0 if share == "one_gpu" else None,
                force_port=path == "port", ranks_per_host=1 if path == "ucx" else 0,
                ucx=path == "ucx", env=UCX_ENV if path == "ucx" else ()))
    # Four processes on GPU 0; the last one dies (memory, forced port, two simulated hosts
    # over UCX). The survivors' 1,000 steps must not outlast jax.distributed's heartbeat.
    for path in ("mem", "port", "ucx"):
        ucx = path == "ucx"
        out.append(LLConfig(
            f"mask_lost_rank-one_gpu-{path}", files=MASK, only=("mask_lost_rank",), nproc=4,
            gpus=1, gpu=0, force_port=path == "port", ranks_per_host=2 if ucx else 0, ucx=ucx,
            env=UCX_ENV if ucx else (), steps=1000, heartbeat_s=600, dies=(3,)))
    out += paths(LLConfig("mask_user-one_gpu", files=MASK, only=("mask_user",), nproc=4, gpus=1,
                          gpu=0))
    for layout in HOSTS:
        out.append(hosts("simulated_hosts", layout, quick=True,
                         steps=int(os.environ.get("JMEP_UCX_STEPS", "1000"))))
        out.append(hosts("simulated_hosts_fresh_routing", layout, files=LIFE, only=("long_run",),
                         steps=1000, chunk=250))
        out.append(hosts("simulated_hosts_cuda_graphs", layout, files=LIFE,
                         only=("graph_replay",), steps=200, env=(("XLA_FLAGS", GRAPH_FLAGS),)))
    for mode_name in sorted(LONG_STEPS):
        steps = int(os.environ.get("JMEP_LONG_STEPS", LONG_STEPS[mode_name]))
        for path in ("mem", "port"):
            out.append(mode(f"long_run-{path}", mode_name, files=LIFE, only=("long_run",),
                            steps=steps, chunk=min(1000, steps), force_port=path == "port",
                            slow=True))
    for mode_name in ("one_rank", "one_gpu_multi", "two_gpus_multi"):
        for path in ("mem", "port"):
            out.append(mode(f"create_destroy-{path}", mode_name, files=LIFE,
                            only=("create_destroy",), steps=100, force_port=path == "port",
                            slow=True))
            out.append(mode(f"exit_without_close-{path}", mode_name, files=LIFE,
                            only=("exit_without_close",), force_port=path == "port",
                            clean_exit=True))
    out.append(hosts("simulated_hosts_lifecycle-create_destroy", "2x1", files=LIFE,
                     only=("create_destroy",), steps=100, clean_exit=True))
    out.append(hosts("simulated_hosts_lifecycle-exit_without_close", "2x1", files=LIFE,
                     only=("exit_without_close",), clean_exit=True))
    return out


# The cases on CPU devices (the pure-JAX reference), one process per device: the harness
# itself, here and in CI. The default one picks a few cases of each kind (about 5 s each on
# two cores); the slow one runs every case, the lifecycle ones with short loops.
CPU = {c.name: c for c in [
    LLConfig("cpu-two_processes", files=MAIN + LIFE + MASK, nproc=2, platform="cpu", steps=20,
             only=("size_hint", "peer_channels", "step-basic_fp8", "step-dups_and_bad_ids",
                   "loop_1000", "create_destroy", "mask_user")),
    LLConfig("cpu-two_processes-all", files=MAIN + LIFE + MASK, nproc=2, platform="cpu", steps=20,
             chunk=10, slow=True),
    LLConfig("cpu-one_process-two_ranks", nproc=0, platform="cpu", steps=20, slow=True,
             env=(("XLA_FLAGS", "--xla_force_host_platform_device_count=2"),)),
]}


def by_name():
    return {c.name: c for c in gpu_configs() + list(CPU.values())}
