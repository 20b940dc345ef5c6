"""The EP group a rank process belongs to: jax.distributed from the launcher's
settings (tests/mp_env.py), the mesh over every rank, Buffers shared by the cases,
and the helpers that move per-rank data in and out of that mesh."""

from __future__ import annotations

import time

import numpy as np

from mp_env import RankSettings


class EPGroup:
    def __init__(self, settings: RankSettings):
        import jax
        from jax.sharding import Mesh

        self.settings = s = settings
        self.jax = jax
        if s.platform == "cpu":
            # Cross-process collectives on CPU devices go through gloo.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if s.coordinator:
            # A task silent for heartbeat_s makes the coordination service end every other
            # process (SIGABRT): cases that outlive a dead peer set it longer.
            beat = {"heartbeat_timeout_seconds": s.heartbeat_s} if s.heartbeat_s else {}
            jax.distributed.initialize(coordinator_address=s.coordinator,
                                       num_processes=s.num_processes, process_id=s.process_id,
                                       local_device_ids=[s.process_id if s.device is None
                                                         else s.device], **beat)
        self.devices = sorted(jax.devices(s.platform), key=lambda d: d.id)
        self.num_ranks = len(self.devices)
        self.mesh = Mesh(np.array(self.devices), ("ep",))
        # jax.devices("cpu")[0] may belong to another process: the reference runs here.
        self.cpu = jax.local_devices(backend="cpu")[0]
        self.on_gpu = s.platform == "gpu"
        path = "/port" if s.force_port else "/mem"
        host = s.effective_host_id()
        self.tag = (f"[{'multi' if s.coordinator else 'single'}{path}{'/' + host if host else ''}"
                    f" p{s.process_id}]")
        self.buffers = {}
        self.log(f"R={self.num_ranks} devices={self.devices} seed={s.seed}")

    @classmethod
    def start(cls) -> "EPGroup":
        return cls(RankSettings.from_env())

    def log(self, *a) -> None:
        print(self.tag, *a, flush=True)

    def new_buffer(self, e, m, h, *, timeout_s=20.0, on_peer_failure="raise"):
        import jax_mscclpp_ep as ep
        return ep.Buffer(ep.EPConfig(num_experts=e, max_tokens_per_rank=m, hidden=h),
                         mesh=self.mesh, axis_name="ep", force_port=self.settings.force_port,
                         timeout_s=timeout_s, on_peer_failure=on_peer_failure)

    def buffer(self, e, m, h):
        """The group's Buffer of this shape, made on first use and kept for later cases
        (as a model keeps one): closed at the end of the session."""
        if (e, m, h) not in self.buffers:
            self.buffers[(e, m, h)] = self.new_buffer(e, m, h)
        return self.buffers[(e, m, h)]

    def put(self, a):
        """A global [R, ...] array from per-rank data that every process holds in full."""
        from jax.sharding import NamedSharding, PartitionSpec as P
        a = np.asarray(a)
        return self.jax.make_array_from_callback(a.shape, NamedSharding(self.mesh, P("ep")),
                                                 lambda i: a[i])

    def local(self, out):
        """{rank: numpy} for the shards this process holds."""
        return {self.devices.index(s.device): np.asarray(s.data)[0] for s in out.addressable_shards}

    def sharded(self, fn):
        """jit(shard_map(fn)) over the group: fn sees one rank's slice of each argument."""
        from jax.sharding import PartitionSpec as P

        def body(*a):
            out = fn(*[v[0] for v in a])
            return self.jax.tree.map(lambda o: o[None], out)
        return self.jax.jit(self.jax.shard_map(body, mesh=self.mesh, in_specs=P("ep"),
                                               out_specs=P("ep")))

    def barrier(self, name: str, timeout_s: float = 120.0) -> None:
        """All processes here before any goes on (a kernel's timeout counts from the
        first rank to arrive). Through the jax.distributed key-value store: no device
        collective, which two processes sharing one GPU could not form."""
        if not self.settings.coordinator:
            return
        from jax_mscclpp_ep import kv
        kv.barrier(name, timeout_s)

    def finish(self) -> None:
        for b in self.buffers.values():
            b.close()
        if self.settings.coordinator and self.settings.process_id == 0:
            time.sleep(3)  # the coordinator outlives the peers' last key-value reads
