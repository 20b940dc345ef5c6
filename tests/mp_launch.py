"""Start one test group: N processes, each running pytest on the same case modules
(tests/multiprocess/), with their settings in the environment (tests/mp_env.py),
output to per-rank logs that survive a kill, one hard limit for the whole group,
and per-case results read back from each rank's report (tests/mp_verdict.py)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

from mp_env import RankSettings
from mp_verdict import GroupRun, RankResult, died_on_purpose

CASES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiprocess")
TESTS_DIR = os.path.dirname(CASES_DIR)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def log_dir() -> str:
    """JMEP_LL_LOG_DIR if set (the GPU scripts keep logs under $OUT), else a temporary folder."""
    base = os.environ.get("JMEP_LL_LOG_DIR") or tempfile.mkdtemp(prefix="jmep_mp_")
    os.makedirs(base, exist_ok=True)
    return base


def rank_env(settings: RankSettings, extra: dict) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if "xla_force_host_platform_device_count" not in f]  # the parent's virtual CPUs
    env["XLA_FLAGS"] = " ".join(flags)
    env.pop("CUDA_VISIBLE_DEVICES", None)   # every rank sees every GPU (CUDA IPC) unless told
    env.update(XLA_PYTHON_CLIENT_PREALLOCATE="false", NCCL_NVLS_ENABLE="0", PYTHONUNBUFFERED="1")
    if settings.platform == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
    # The helpers and the plugin, not the repository root: ranks import the installed package.
    env["PYTHONPATH"] = os.pathsep.join(
        [CASES_DIR, TESTS_DIR] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(settings.to_env())
    env.update(extra)
    return env


def pytest_cmd(targets, pytest_args=()):
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "case_report",
            "-c", os.path.join(CASES_DIR, "pytest.ini"), "--rootdir", CASES_DIR,
            *targets, *pytest_args]


@functools.lru_cache(maxsize=None)
def list_cases(files: tuple, platform: str) -> list:
    """[{"case": node id, "marks": [...]}] of the case modules, as the ranks collect them."""
    with tempfile.TemporaryDirectory(prefix="jmep_mp_list_") as d:
        out = os.path.join(d, "cases.json")
        cmd = pytest_cmd([os.path.join(CASES_DIR, f) for f in files],
                         ["--collect-only", "-q", "--list-cases", out])
        proc = subprocess.run(cmd, env=rank_env(RankSettings(platform=platform), {}), cwd=d,
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"collecting {files} failed:\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}")
        with open(out) as f:
            return json.load(f)


@dataclasses.dataclass
class Launch:
    """A group to start: nproc processes (0: one process holding every rank), their
    common settings (process id, coordinator, seed, report filled in here), and
    what pytest runs in each (case node ids, or files, plus pytest options)."""

    name: str
    targets: list
    settings: RankSettings
    nproc: int = 0
    env: dict = dataclasses.field(default_factory=dict)
    pytest_args: list = dataclasses.field(default_factory=list)
    timeout_s: float = float(os.environ.get("JMEP_LL_TEST_TIMEOUT", "900"))
    wrap: str = ""           # a command before each rank's python ({rank} replaced), e.g. a sanitizer
    # After a rank fails hard (non-zero exit, signal) the others usually wait for it in
    # a collective: they get this long to finish or report, then the group ends.
    grace_s: float = float(os.environ.get("JMEP_MP_GRACE_S", "60"))
    may_die: tuple = ()      # ranks that kill themselves on purpose (SIGKILL): no grace timer

    def commands(self, log_dir):
        coordinator = f"127.0.0.1:{free_port()}" if self.nproc else ""
        seed = self.settings.seed or fresh_seed()
        targets = [t if os.path.isabs(t) else os.path.join(CASES_DIR, t) for t in self.targets]
        # A per-case stack dump in the log if one case runs long (the group keeps going).
        args = ["-s", "-v", "-o", f"faulthandler_timeout={int(min(self.timeout_s, 300))}",
                *self.pytest_args]
        out = []
        for pid in range(max(self.nproc, 1)):
            base = os.path.join(log_dir, f"{self.name}_{pid}")
            s = dataclasses.replace(self.settings, coordinator=coordinator, seed=seed,
                                    num_processes=max(self.nproc, 1), process_id=pid,
                                    report=base + ".jsonl")
            cmd = shlex.split(self.wrap.format(rank=pid)) + pytest_cmd(targets, args)
            out.append((cmd, rank_env(s, self.env), base))
        return out

    def run(self) -> GroupRun:
        folder = log_dir()
        t0, procs = time.monotonic(), []
        for cmd, env, base in self.commands(folder):
            for ext in (".jsonl", ".log"):
                if os.path.exists(base + ext):
                    os.remove(base + ext)  # a report from an earlier run must not count
            log = open(base + ".log", "w")
            log.write(f"# {shlex.join(cmd)}\n")
            log.flush()
            # Its own session, so a kill reaches a wrapped python (sanitizer) too. The rank
            # runs outside the source tree so that it imports the installed package.
            procs.append((subprocess.Popen(cmd, env=env, cwd=folder, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True),
                          log, base))
        killed = wait_group([p for p, _, _ in procs], t0 + self.timeout_s, self.timeout_s, self.grace_s,
                            self.may_die)
        ranks = []
        for i, (p, log, base) in enumerate(procs):
            log.close()
            ranks.append(RankResult.read(i, p.returncode, killed.get(i, ""), base + ".jsonl",
                                         base + ".log"))
        return GroupRun(self.name, ranks, time.monotonic() - t0)


def wait_group(procs, deadline, timeout_s, grace_s, may_die=()) -> dict:
    """Wait for every process; kill all at the deadline, or grace_s after one fails
    hard (not counting the ranks in may_die killed by SIGKILL). Returns {rank: why it
    was killed}."""
    killed, failed_at = {}, None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.returncode not in (None, 0)
                                     and not died_on_purpose(i, p.returncode, may_die)
                                     for i, p in enumerate(procs)):
            failed_at = now
        why = (f"group timeout after {timeout_s:.0f} s" if now >= deadline else
               f"{grace_s:.0f} s after another rank failed" if failed_at is not None
               and now >= failed_at + grace_s else "")
        if why:
            for i, p in enumerate(procs):
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
                    killed[i] = why
            break
        time.sleep(0.2)
    return killed
