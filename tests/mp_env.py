"""What a launcher tells each rank process of a multi-process test group: one place
for the environment variables, written by tests/mp_launch.py, read by the rank side
(tests/multiprocess/ll_group.py), so both sides agree on the names."""

from __future__ import annotations

import dataclasses
import os

PREFIX = "JMEP_MP_"


@dataclasses.dataclass(frozen=True)
class RankSettings:
    """One rank process's part in a group. coordinator "" = one process holding every
    rank (no jax.distributed); device: the local device ordinal this process drives
    (None: every visible device, or its process id in a group); host_id: its
    JMEP_HOST_ID (""; with ranks_per_host > 0 it is simhost<process_id // ranks_per_host>)."""

    platform: str = "gpu"          # "gpu": the kernels; "cpu": the pure-JAX reference
    coordinator: str = ""          # "127.0.0.1:PORT" in a multi-process group
    num_processes: int = 1
    process_id: int = 0
    device: int | None = None
    force_port: bool = False
    ranks_per_host: int = 0
    host_id: str = ""
    steps: int = 1000              # loops: steps per run
    chunk: int = 1000              # long_run: steps per jitted loop
    seed: int = 0                  # the group's seed: every rank draws the same data
    heartbeat_s: int = 0           # jax.distributed's heartbeat timeout (0: jax's default, 100 s)
    report: str = ""               # per-case JSON lines of this rank (tests/multiprocess/case_report.py)

    def effective_host_id(self) -> str:
        if self.ranks_per_host:
            return f"simhost{self.process_id // self.ranks_per_host}"
        return self.host_id

    def to_env(self) -> dict[str, str]:
        env = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            env[PREFIX + f.name.upper()] = "" if v is None else str(int(v) if isinstance(v, bool) else v)
        host = self.effective_host_id()
        if host:
            env["JMEP_HOST_ID"] = host  # read by the package at bootstrap
        return env

    @classmethod
    def from_env(cls, environ=None) -> "RankSettings":
        environ = os.environ if environ is None else environ
        kw = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(PREFIX + f.name.upper())
            if raw is None:
                continue
            if f.name == "device":
                kw[f.name] = int(raw) if raw else None
            elif f.name == "force_port":
                kw[f.name] = raw not in ("", "0")
            elif isinstance(f.default, int):
                kw[f.name] = int(raw)
            else:
                kw[f.name] = raw
        return cls(**kw)
