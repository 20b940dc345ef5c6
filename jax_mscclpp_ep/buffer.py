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
from . import mask

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
    given different ids act as separate hosts. on_peer_failure: "raise" (a peer that
    stops answering fails the call and every later one) or "mask" (the survivors mask it
    and keep serving without its experts; see ``mask_ranks`` and README "Surviving a lost
    rank").

    DeepEP-named methods (``low_latency_dispatch``, ``low_latency_combine``,
    ``get_low_latency_rdma_size_hint``, ...) are attached by ``deepep.py``.
    """

    def __init__(self, config: cfg.EPConfig, *, mesh=None, axis_name: str = "ep", devices=None,
                 force_port: bool | None = None, timeout_s: float | None = None,
                 host_id: str | None = None, on_peer_failure: str = "raise"):
        if not isinstance(config, cfg.EPConfig):
            raise TypeError(f"config must be an EPConfig, got {type(config).__name__}")
        self.on_peer_failure = mask.check_policy(on_peer_failure)
        self._host_mask = mask.HostMask()  # the mask of a Buffer without device state
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

    def mask_ranks(self, ranks) -> None:
        """Stop exchanging with ``ranks`` (ints in [0, R)), added to those already masked:
        tokens routed to their experts are dropped (counted in ``dropped_ids``), their
        slots add nothing in combine, and a masked rank's own calls return empty / zero
        outputs. Every process of the group calls it with the same list, between steps.
        On GPUs the kernels read the mask on the device (nothing retraces); on CPU the
        reference is traced with it, so this clears JAX's caches."""
        self.check_open()
        ranks = mask.check_ranks(ranks, self.num_ranks)
        if self._device_state is not None:
            self._device_state.mask_ranks(ranks)
        else:
            self._host_mask.add(ranks)

    def unmask_all(self) -> None:
        """Exchange with every rank again and forget the mask events (every process, between
        steps; each rank must be alive and still in its loop)."""
        self.check_open()
        if self._device_state is not None:
            self._device_state.unmask_all()
        else:
            self._host_mask.clear()

    def masked_ranks(self) -> list:
        """Sorted masked ranks as this process's devices see them (GPUs: synchronises)."""
        self.check_open()
        if self._device_state is not None:
            return self._device_state.masked_ranks()
        return list(self._host_mask.ranks)

    def mask_events(self) -> list:
        """[mask.MaskEvent(peer, detected_by, phase)] per masked peer: who found it silent and
        where (detected_by -1: masked by the user)."""
        self.check_open()
        if self._device_state is not None:
            return self._device_state.mask_events()
        return self._host_mask.events()

    def trace_mask(self) -> tuple:
        """The masked ranks the CPU reference is traced with: the host mask; () on GPUs
        (their kernels read the device's mask)."""
        return () if self._device_state is not None else self._host_mask.ranks

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
