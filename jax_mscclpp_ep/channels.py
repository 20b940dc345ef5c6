"""Bootstrap of the channel layer: one ``Communicator`` per local GPU.

A rank is one GPU. Each communicator allocates its registered buffer, then
ranks swap a small blob (host identity, pid, PCI bus id, CUDA IPC handle, and
a UCX address where needed) and map each other's buffers. In a multi-process
job (after ``jax.distributed.initialize``) the blobs go through JAX's
distributed key-value store under a per-instance namespace; with one process
driving all local GPUs they are swapped in process.

Topology: every rank has a host identity (``host_id=``, else ``JMEP_HOST_ID``,
else hostname + boot id), swapped first. A peer on another host gets a UCX
port channel (the UCX connection library is loaded only then); a peer on this
host a memory channel (NVLink/P2P) where reachable, else a CUDA-IPC port
channel; ``force_port`` / ``JMEP_FORCE_PORT_CHANNELS=1`` forces port channels
everywhere. Processes on one machine given different ``JMEP_HOST_ID``s talk
over UCX exactly as separate hosts would.
"""
from __future__ import annotations

import itertools
import socket

import jax

from . import env, kv, native

_instance_counter = itertools.count()


def _ext():
    if not native.cuda_enabled():
        raise RuntimeError("jax_mscclpp_ep was built without CUDA: no channel layer")
    return native.ext


def default_host_id() -> str:
    """hostname + boot id: processes of one machine (one kernel) share it."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def check_host_id(host_id) -> str:
    """host_id itself, if it is a non-empty string that fits a peer blob (127 bytes)."""
    if not isinstance(host_id, str) or not host_id or len(host_id.encode()) > 127:
        raise ValueError(f"host_id must be a non-empty string of at most 127 bytes, got {host_id!r}")
    return host_id


def resolve_host_id(host_id=None) -> str:
    """The host identity of this process's ranks: the argument, else JMEP_HOST_ID,
    else hostname + boot id."""
    hid = host_id if host_id is not None else env.host_id()
    return check_host_id(str(hid) if hid else default_host_id())


def _resolve_devices(devices):
    """-> (global rank list of (process_index, cuda ordinal), my local ranks)."""
    if devices is not None and all(isinstance(d, int) for d in devices):
        # Plain CUDA ordinals: one process drives them all, no JAX needed.
        ords = list(devices)
        return [(0, o) for o in ords], list(range(len(ords))), False
    if devices is None:
        devices = [d for d in jax.devices() if d.platform == "gpu"]
        if not devices:
            raise RuntimeError("jax_mscclpp_ep: no JAX GPU devices to build communicators for")
    devices = sorted(devices, key=lambda d: d.id)  # jax global device order
    me = jax.process_index()
    # CUDA ordinals matter only for this process's devices (remote ones report None).
    ranks = [(d.process_index, int(d.local_hardware_id) if d.process_index == me else -1)
             for d in devices]
    mine = [r for r, (p, _) in enumerate(ranks) if p == me]
    if not mine:
        raise RuntimeError("jax_mscclpp_ep: none of the given devices belongs to this process")
    multi = len({p for p, _ in ranks}) > 1
    return ranks, mine, multi


def ucx_signal_mode() -> int:
    """JMEP_UCX_SIGNALS: "am" (default; active messages applied by the peer's proxy,
    any transport) or "rma" (UCX atomics on the peer's GPU memory: InfiniBand with
    GPUDirect RDMA)."""
    from . import ucx
    v = env.ucx_signals()
    if v not in ucx.SIGNAL_MODES:
        raise ValueError(f"JMEP_UCX_SIGNALS must be 'am' or 'rma', got {v!r}")
    return ucx.SIGNAL_MODES[v]


_ERR = b"JMEP-ERROR:"  # a rank that cannot take part publishes this instead of its info


def _swap(client, key, mine: dict, n: int, timeout_ms: int) -> dict:
    """Publish this process's {rank: bytes} under key/rank, gather every rank's."""
    out = dict(mine)
    if client is not None:
        for r, b in mine.items():
            kv.put(client, f"{key}/{r}", b)
        for r in range(n):
            if r not in out:
                out[r] = kv.get(client, f"{key}/{r}", timeout_ms)
    for r, b in sorted(out.items()):
        if b.startswith(_ERR) and r not in mine:
            raise RuntimeError(f"jax_mscclpp_ep: rank {r} could not join the EP group: "
                               f"{b[len(_ERR):].decode(errors='replace')}")
    return out


def create_communicators(buffer_bytes: int, *, devices=None, force_port=None, timeout_s=None,
                         namespace=None, fifo_size: int = 1024, kv_timeout_s: float = 120.0,
                         host_id=None):
    """Communicators for this process's devices among ``devices``.

    devices: JAX devices (ranks = their global order; default all GPU devices),
      or a list of CUDA ordinals (single process, ranks in list order).
    host_id: this process's host identity (see the module docstring), or one per
      local rank (a sequence), so that one process can stand in for several hosts.
    Returns the local communicators in rank order.
    """
    ext = _ext()
    ranks, mine, multi = _resolve_devices(devices)
    n = len(ranks)
    force = env.force_port() if force_port is None else bool(force_port)
    tmo = env.timeout_s() if timeout_s is None else float(timeout_s)
    hids = ([resolve_host_id(h) for h in host_id] if isinstance(host_id, (list, tuple))
            else [resolve_host_id(host_id)] * len(mine))
    if len(hids) != len(mine):
        raise ValueError(f"host_id: {len(hids)} ids for {len(mine)} local ranks")
    ns = namespace or "jmep_channels"
    ns = f"{ns}/{next(_instance_counter)}"  # two instances never share keys
    client = kv.client() if multi else None
    kv_ms = int(kv_timeout_s * 1000)
    comms = []
    try:
        for r, hid in zip(mine, hids):
            comms.append(ext.Communicator(r, n, ranks[r][1], int(buffer_bytes), force,
                                         int(tmo * 1e9), int(fifo_size), hid))
        if not multi and len(mine) != n:
            raise RuntimeError("jax_mscclpp_ep: ranks live in other processes but the job is single-process")
        hosts = _swap(client, f"{ns}/host", {r: h.encode() for r, h in zip(mine, hids)}, n, kv_ms)
        # Local ranks with a peer on another host: they reach it over UCX port channels.
        remote = [c for c in comms if any(hosts[r] != hosts[c.rank] for r in range(n))]
        if remote:
            # A peer on another host: UCX port channels. A rank that cannot load UCX
            # tells the others instead of leaving them to wait for its info.
            try:
                from . import ucx
                ucx.load()
                mode = ucx_signal_mode()
                for c in remote:
                    c.enable_ucx(ucx.library_path(), mode)
            except Exception as e:  # noqa: BLE001 - reported to every rank, then raised
                if client is not None:
                    for r in mine:
                        kv.put(client, f"{ns}/info/{r}", _ERR + str(e).encode())
                raise
        infos = _swap(client, f"{ns}/info", {c.rank: c.local_info() for c in comms}, n, kv_ms)
        blob = [infos[r] for r in range(n)]
        for c in comms:
            c.connect(blob)
        if multi:
            kv.barrier(f"{ns}/connected", kv_timeout_s)  # nobody uses a peer before all have mapped
    except BaseException:
        for c in comms:
            c.close()
        raise
    return comms


def close_communicators(comms, *, kv_timeout_s: float = 120.0, namespace=None) -> None:
    """Close local communicators after every process is done with its peers.

    namespace: a name all processes agree on for this group (default: a counter,
    which agrees when every process closes its groups in the same order). A peer
    that never arrives costs kv_timeout_s; the local teardown happens regardless.
    """
    comms = list(comms)
    if not comms:
        return
    err = None
    for c in comms:
        try:
            c.sync()
        except RuntimeError as e:  # still tear down; report afterwards
            err = err or e
    multi = jax.process_count() > 1
    ns = f"jmep_channels_close/{namespace or next(_instance_counter)}"
    if multi:
        try:
            kv.barrier(ns, kv_timeout_s)
        except Exception as e:  # noqa: BLE001 - a peer is gone: free our side anyway
            err, multi = err or RuntimeError(f"jax_mscclpp_ep: peers did not reach close: {e}"), False
    for c in comms:
        c.close()
    if multi:
        # Peers' mappings of our buffers are gone too once everyone is here,
        # so the memory is really released on every rank.
        try:
            kv.barrier(ns + "/done", kv_timeout_s)
        except Exception as e:  # noqa: BLE001
            err = err or RuntimeError(f"jax_mscclpp_ep: peers did not finish close: {e}")
    if err is not None:
        raise err
