"""Per-Buffer device state on this process's GPUs (only with the CUDA build).

``attach`` is what a ``Buffer`` on GPUs calls: it creates the communicators
(registered buffer + channels) of this process's GPUs and registers the LL state
that the FFI handlers find by (buffer id, device ordinal) on every call. The
custom calls themselves are lowered in ``lowering.py``.
"""

from __future__ import annotations

import jax

from . import native

if not native.cuda_enabled():  # a GPU Buffer reached this module without the CUDA build
    raise ImportError(native.no_cuda_message())

from . import arch, channels, env, kv, lowering, mask  # noqa: E402
from . import config as cfg  # noqa: E402

ext = native.ext


class GpuState:
    """The LL state of one Buffer on this process's GPUs."""

    def __init__(self, buffer_id: int, comms, devices):
        self.buffer_id = buffer_id
        self.comms = comms
        self.devices = devices  # CUDA ordinals, one per communicator

    def check(self) -> None:
        for dev in self.devices:
            ext.ll_check(self.buffer_id, dev)

    def peer_channels(self) -> dict:
        return {c.rank: [c.describe_peer(p) for p in range(c.nranks)] for c in self.comms}

    def dropped(self) -> int:
        """Expert ids outside [-1, E) seen so far (synchronises: for tests)."""
        return sum(int(ext.ll_dropped(self.buffer_id, dev)) for dev in self.devices)

    def mask_ranks(self, ranks) -> None:
        ext.ll_mask_ranks(self.buffer_id, list(ranks))

    def unmask_all(self) -> None:
        ext.ll_unmask_all(self.buffer_id)

    def masked_ranks(self) -> list:
        """The union over this process's GPUs (they agree once every signal has arrived)."""
        return sorted({int(r) for dev in self.devices for r in ext.ll_masked_ranks(self.buffer_id, dev)})

    def mask_events(self) -> list:
        return mask.merge_events(ext.ll_mask_events(self.buffer_id, dev) for dev in self.devices)

    def timing(self, reset: bool = False) -> dict:
        """Mean kernel times (µs) booked on the device since the last reset, averaged over this
        process's GPUs: dispatch/combine total and send phase (synchronises: benchmarks only)."""
        rows = [list(ext.ll_timing(self.buffer_id, dev, reset)) for dev in self.devices]
        out = {}
        for i, name in ((0, "dispatch"), (3, "combine")):
            calls = sum(r[i] for r in rows)
            if calls:
                out[f"{name}_kernel"] = sum(r[i + 2] for r in rows) / calls / 1e3
                out[f"{name}_kernel_send"] = sum(r[i + 1] for r in rows) / calls / 1e3
        return out

    def close(self, barrier_timeout_s: float = 120.0) -> None:
        for dev in self.devices:
            ext.ll_unregister(self.buffer_id, dev)
        if self.comms:
            # after every process is done with them
            channels.close_communicators(self.comms, kv_timeout_s=barrier_timeout_s,
                                         namespace=f"jmep_ll_{self.buffer_id}")
        self.comms = []


def validate(config: cfg.EPConfig, devices) -> None:
    """What Buffer(...) checks on GPUs before it takes an id: the kernels support the
    config's hidden size and this process's GPUs can run the compiled kernels."""
    lowering.check_hidden(config.hidden)
    arch.check_devices(devices)


def set_peer_failure(buffer) -> None:
    """With on_peer_failure="mask", a wait that times out on a peer masks it instead of
    failing the call (before any rank can signal: every process sets it before the barrier)."""
    if buffer.on_peer_failure == "mask":
        ext.ll_set_peer_failure(buffer.id, True)


def attach(buffer, devices, num_ranks: int) -> GpuState:
    """Create the communicators and LL state of ``buffer`` on this process's GPUs
    (after ``validate``)."""
    c = buffer.config
    force_port = env.force_port() if buffer.force_port is None else bool(buffer.force_port)
    devices = list(devices)
    local = [d for d in devices if d.process_index == jax.process_index()]
    if env.p2p():  # direct peer access instead of communicators
        if force_port:
            raise RuntimeError("JMEP_LL_P2P=1 reaches peers by direct stores: no port channels")
        if jax.process_count() > 1 or len(local) != len(devices):
            raise RuntimeError("JMEP_LL_P2P=1: one process must drive every GPU of the EP group")
        ordinals = [d.local_hardware_id for d in devices]
        timeout = buffer.timeout_s if buffer.timeout_s is not None else env.timeout_s()
        ext.ll_register_p2p(buffer.id, ordinals, c.max_tokens_per_rank, c.hidden, c.num_experts,
                            float(timeout))
        set_peer_failure(buffer)
        return GpuState(buffer.id, [], ordinals)

    comms = channels.create_communicators(
        c.size_hint(num_ranks), devices=devices, force_port=force_port,
        timeout_s=buffer.timeout_s, namespace=f"jmep_ll_{buffer.id}", host_id=buffer.host_id)
    ordinals = []
    try:
        for comm in comms:
            ext.ll_register(buffer.id, comm, c.max_tokens_per_rank, c.hidden, c.num_experts)
            ordinals.append(int(comm.device))
        set_peer_failure(buffer)
    except BaseException:
        for dev in ordinals:
            ext.ll_unregister(buffer.id, dev)
        raise
    # No rank may signal a peer before the peer's signal words are zeroed.
    kv.barrier(f"jmep_ll_{buffer.id}_registered", 120.0)
    return GpuState(buffer.id, comms, ordinals)

