"""The persistent communication buffer: one per EP layer, created once per process.

On CPU devices a Buffer is only a handle on its config (the reference needs
no device state). On GPUs it owns the registered communication buffer and
channels of every local device (``gpu.attach``), which the FFI handlers find
by the buffer's id and their device ordinal.
"""

from __future__ import annotations

import atexit
import itertools
import threading
import warnings
import weakref

import jax

from . import channels
from . import config as cfg

_ids = itertools.count(1)
_ids_lock = threading.Lock()


_open_buffers: "weakref.WeakSet[Buffer]" = weakref.WeakSet()


class BufferClosedError(RuntimeError):
    pass


@atexit.register
def _close_at_exit():
    """Release proxy threads, IPC mappings and device memory of Buffers left open.
    Registered after jax's own exit hooks, so it runs before jax.distributed shuts
    down; peers that are already gone cost at most a few seconds, never a hang."""
    for buf in sorted(_open_buffers, key=lambda b: b.id):  # the same order on every process
        try:
            buf.close(_barrier_timeout_s=5.0)
        except Exception as e:  # noqa: BLE001 - exiting anyway: one line, no traceback
            warnings.warn(f"jax_mscclpp_ep: closing {buf!r} at exit: {e}", RuntimeWarning)


class Buffer:
    """Persistent state for dispatch/combine on one EP axis.

    config: EPConfig (E, M, H). mesh/axis_name: the EP mesh axis the calls run
    over (its size R must divide E). devices: the devices of the EP group
    (default: the mesh's devices, else all devices). force_port: reach every
    peer through port channels (proxy), as over RDMA. timeout_s: how long a
    device-side wait may last before the call fails. host_id: this process's host
    identity (default ``JMEP_HOST_ID``, else hostname + boot id): peers with another
    host identity are reached through UCX port channels, so processes on one machine
    given different ids act as separate hosts.

    DeepEP-named methods (``low_latency_dispatch``, ``low_latency_combine``,
    ``get_low_latency_rdma_size_hint``, ...) are attached by ``deepep.py``.
    """

    def __init__(self, config: cfg.EPConfig, *, mesh=None, axis_name: str = "ep", devices=None,
                 force_port: bool | None = None, timeout_s: float | None = None,
                 host_id: str | None = None):
        if not isinstance(config, cfg.EPConfig):
            raise TypeError(f"config must be an EPConfig, got {type(config).__name__}")
        self.config = config
        self.axis_name = axis_name
        self.mesh = mesh
        if mesh is not None:
            if axis_name not in mesh.shape:
                raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh {dict(mesh.shape)}")
            self.num_ranks = int(mesh.shape[axis_name])
            devices = list(mesh.devices.flat) if devices is None else list(devices)
        else:
            devices = list(jax.devices()) if devices is None else list(devices)
            self.num_ranks = len(devices)
        cfg.check_num_ranks(config, self.num_ranks)
        self.devices = devices
        self.force_port = force_port
        self.timeout_s = timeout_s
        self.host_id = None if host_id is None else channels.check_host_id(host_id)
        self._closed = False
        self._device_state = None
        on_gpu = any(d.platform == "gpu" for d in devices)
        if on_gpu:
            from . import gpu  # needs the CUDA build
            gpu.validate(config, devices)
        # Only a Buffer that passed validation takes an id, so failed attempts leave the
        # numbering alone (ids name each Buffer's key-value namespace across processes).
        with _ids_lock:
            self.id = next(_ids)
        if on_gpu:
            self._device_state = gpu.attach(self, devices, self.num_ranks)
            _open_buffers.add(self)

    @property
    def closed(self) -> bool:
        return self._closed

    def size_hint(self) -> int:
        return self.config.size_hint(self.num_ranks)

    def check_open(self) -> None:
        if self._closed:
            raise BufferClosedError(f"Buffer {self.id} was closed; create a new Buffer")

    def check(self) -> None:
        """Raise if a device-side error (e.g. a peer timeout) was recorded."""
        self.check_open()
        if self._device_state is not None:
            self._device_state.check()

    def peer_channels(self):
        """{rank: [how that rank reaches each peer]} for this process's ranks: "self",
        "memory" (NVLink/P2P stores), "cuda-ipc" (port channel, copy engine) or "ucx"
        followed by the UCX endpoint's transports. CPU buffers: None."""
        self.check_open()
        if self._device_state is None:
            return None
        return self._device_state.peer_channels()

    def dropped_ids(self):
        """How many (token, slot) expert ids outside [-1, E) dispatch has met on this process's
        GPUs since the buffer was created. They are never sent (treated like -1), and no
        kernel touches memory for them. Synchronises the devices: call it between steps,
        not inside jit. CPU buffers keep no device state: None (the reference drops them
        the same way)."""
        self.check_open()
        if self._device_state is None:
            return None
        return self._device_state.dropped()

    def close(self, *, _barrier_timeout_s: float = 120.0) -> None:
        """Free the device state (every process of the EP group calls it: the ranks
        wait for each other so no peer still writes into freed memory)."""
        if self._closed:
            return
        self._closed = True
        _open_buffers.discard(self)
        if self._device_state is not None:
            state, self._device_state = self._device_state, None
            state.close(barrier_timeout_s=_barrier_timeout_s)
            # No jax.clear_caches(): every executable compiled for this Buffer holds its
            # own reference to the device state the kernels read (the FFI instantiate
            # stage, ffi/handlers/ll_ref.cc), which close() marked closed. Running such an
            # executable again fails in the FFI handler ("Buffer N was closed"); a kernel
            # that XLA replays from a CUDA graph without asking the handler sees the mark
            # and returns before touching any peer or freed memory (its outputs are then
            # undefined). Other jitted functions keep their compiled code.

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        c = self.config
        return (f"Buffer(id={self.id}, E={c.num_experts}, M={c.max_tokens_per_rank}, H={c.hidden}, "
                f"R={self.num_ranks}, axis={self.axis_name!r}{', closed' if self._closed else ''})")
