"""GPU side of dispatch/combine: FFI targets, CUDA lowerings, per-Buffer device state.

Imported by the package when the native module has CUDA. ``attach`` is what a
``Buffer`` on GPUs calls: it creates the communicators (registered buffer +
channels) of this process's GPUs and registers the LL state that the FFI
handlers find by (buffer id, device ordinal) on every call.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
from jax import lax
from jax.interpreters import mlir

from . import _native
from ._native import _ep

if not _native.cuda_enabled():  # a GPU Buffer reached this module without the CUDA build
    raise ImportError(_native.no_cuda_message())

from . import arch  # noqa: E402
from . import config as cfg  # noqa: E402
from .primitives import combine_p, dispatch_p
from .split import combine_recv_p, combine_send_p, dispatch_recv_p, dispatch_send_p

DISPATCH_TARGET = "jmep_ll_dispatch"
COMBINE_TARGET = "jmep_ll_combine"
DISPATCH_SEND_TARGET = "jmep_ll_dispatch_send"
COMBINE_SEND_TARGET = "jmep_ll_combine_send"
_PHASES_BOTH, _PHASES_RECV = 3, 2  # kLlPhaseBoth / kLlPhaseRecv in ll_args.cuh

# (name, {"instantiate": capsule, "execute": capsule}) per target: the instantiate
# stage ties the Buffer's device state to each executable that calls it.
_TARGETS = dict(_ep.ffi_targets())
for _name, _bundle in _TARGETS.items():
    jax.ffi.register_ffi_target(_name, _bundle, platform="CUDA")
# [(name, "i64" | "bool")]: every LL custom call takes exactly these (ll_attrs.h).
_LL_ATTRIBUTES = tuple(_ep.ll_attributes())


def ll_attrs(**values) -> dict:
    """The attributes of one LL custom call, typed as the handlers decode them."""
    return {name: bool(values[name]) if kind == "bool" else np.int64(values[name])
            for name, kind in _LL_ATTRIBUTES}


def _check_target(name: str, buffer_id) -> None:
    if buffer_id is None or int(buffer_id) < 0:
        raise ValueError("a jax_mscclpp_ep.Buffer is required on GPU: pass buffer=Buffer(config, "
                         "mesh=...) to dispatch/combine (an EPConfig only runs the CPU reference)")
    if name not in _TARGETS:
        raise RuntimeError(f"this build of jax_mscclpp_ep has no {name} kernel (built without the "
                           "channel layer or the XLA FFI headers)")


def _check_hidden(h: int) -> None:
    if h % cfg.GPU_HIDDEN_MULTIPLE or h > cfg.GPU_MAX_HIDDEN:
        raise ValueError(f"the CUDA kernels need hidden to be a multiple of {cfg.GPU_HIDDEN_MULTIPLE} "
                         f"and <= {cfg.GPU_MAX_HIDDEN}, got {h}")


def isolated_call(target: str, avals_out, operands, aliases, **attrs):
    """One FFI custom call whose operands and results pass through optimization barriers.

    The barriers keep XLA:GPU's dynamic-slice fusion (on by default in jax 0.11) from
    folding the slicing of stacked lax.scan residuals into our custom call's operands
    and results: with that fusion our kernels got wrong data inside while loops (the
    router gradient of layers scanned on one Buffer, 1x H200, jax 0.11.2; correct with
    --xla_gpu_enable_dynamic_slice_fusion=false). The slices become ordinary copies.
    Traced inside a lowering (``mlir.lower_fun``)."""
    out_types = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals_out)
    operands = lax.optimization_barrier(tuple(operands))
    outs = jax.ffi.ffi_call(target, out_types, input_output_aliases=aliases)(*operands, **attrs)
    return list(lax.optimization_barrier(tuple(outs)))


def ffi_lowering(target: str, aliases: dict, attrs_of):
    """Lowering rule of a primitive to ``target``: attrs_of(avals_in, **params) checks the
    call and returns the handler's attributes."""
    def rule(ctx, *args, **params):
        attrs = attrs_of(ctx.avals_in, **params)
        fn = lambda *xs: isolated_call(target, ctx.avals_out, xs, aliases, **attrs)  # noqa: E731
        return mlir.lower_fun(fn, multiple_results=True)(ctx, *args)
    return rule


def _common(target, buffer_id, hidden):
    _check_target(target, buffer_id)
    _check_hidden(hidden)


def _dispatch_attrs(avals, *, num_experts, max_tokens, use_fp8, round_scale, buffer_id,
                    phases=_PHASES_BOTH, target=DISPATCH_TARGET, **_):
    _common(target, buffer_id, avals[0].shape[1])
    return ll_attrs(buffer_id=buffer_id, num_experts=num_experts, max_tokens=max_tokens,
                    use_fp8=use_fp8, round_scale=round_scale, phases=phases)


def _combine_attrs(avals, *, num_experts, max_tokens, buffer_id, phases=_PHASES_BOTH,
                   target=COMBINE_TARGET, **_):
    _common(target, buffer_id, avals[0].shape[2])
    return ll_attrs(buffer_id=buffer_id, num_experts=num_experts, max_tokens=max_tokens,
                    use_fp8=False, round_scale=False, phases=phases)


_P = functools.partial
mlir.register_lowering(dispatch_p, ffi_lowering(DISPATCH_TARGET, {2: 5, 3: 6}, _dispatch_attrs),
                       platform="cuda")
mlir.register_lowering(combine_p, ffi_lowering(COMBINE_TARGET, {5: 1}, _combine_attrs),
                       platform="cuda")
mlir.register_lowering(dispatch_send_p, ffi_lowering(
    DISPATCH_SEND_TARGET, {2: 0}, _P(_dispatch_attrs, target=DISPATCH_SEND_TARGET)),
    platform="cuda")
mlir.register_lowering(combine_send_p, ffi_lowering(
    COMBINE_SEND_TARGET, {3: 0}, _P(_combine_attrs, target=COMBINE_SEND_TARGET)),
    platform="cuda")
mlir.register_lowering(dispatch_recv_p, ffi_lowering(
    DISPATCH_TARGET, {2: 5, 3: 6}, _P(_dispatch_attrs, phases=_PHASES_RECV)), platform="cuda")
mlir.register_lowering(combine_recv_p, ffi_lowering(
    COMBINE_TARGET, {5: 1}, _P(_combine_attrs, phases=_PHASES_RECV)), platform="cuda")


# ---------------------------------------------------------------- device state

def _env_force_port() -> bool:
    return os.environ.get("JMEP_FORCE_PORT_CHANNELS", "0").strip().lower() not in ("", "0", "false")


def _comm_device(comm, fallback: int) -> int:
    d = getattr(comm, "device", None)
    if callable(d):
        d = d()
    return fallback if d is None else int(d)


def _barrier(name: str, timeout_s: float = 120.0) -> None:
    """All processes reach this point (no-op in a single process)."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed
    client = distributed.global_state.client
    if hasattr(client, "wait_at_barrier"):
        client.wait_at_barrier(name, int(timeout_s * 1000))
        return
    me, n = jax.process_index(), jax.process_count()
    client.key_value_set(f"{name}/{me}", "1")
    for p in range(n):
        client.blocking_key_value_get(f"{name}/{p}", int(timeout_s * 1000))


class GpuState:
    """The LL state of one Buffer on this process's GPUs."""

    def __init__(self, buffer_id: int, comms, devices):
        self.buffer_id = buffer_id
        self.comms = comms
        self.devices = devices  # CUDA ordinals, one per communicator

    def check(self) -> None:
        for dev in self.devices:
            _ep.ll_check(self.buffer_id, dev)

    def peer_channels(self) -> dict:
        return {c.rank: [c.describe_peer(p) for p in range(c.nranks)] for c in self.comms}

    def dropped(self) -> int:
        """Expert ids outside [-1, E) seen so far (synchronises: for tests)."""
        return sum(int(_ep.ll_dropped(self.buffer_id, dev)) for dev in self.devices)

    def timing(self, reset: bool = False) -> dict:
        """Mean kernel times (µs) booked on the device since the last reset, averaged over this
        process's GPUs: dispatch/combine total and send phase (synchronises: benchmarks only)."""
        rows = [list(_ep.ll_timing(self.buffer_id, dev, reset)) for dev in self.devices]
        out = {}
        for i, name in ((0, "dispatch"), (3, "combine")):
            calls = sum(r[i] for r in rows)
            if calls:
                out[f"{name}_kernel"] = sum(r[i + 2] for r in rows) / calls / 1e3
                out[f"{name}_kernel_send"] = sum(r[i + 1] for r in rows) / calls / 1e3
        return out

    def close(self, barrier_timeout_s: float = 120.0) -> None:
        for dev in self.devices:
            _ep.ll_unregister(self.buffer_id, dev)
        if self.comms:
            from . import channels
            # after every process is done with them
            channels.close_communicators(self.comms, kv_timeout_s=barrier_timeout_s,
                                         namespace=f"jmep_ll_{self.buffer_id}")
        self.comms = []


def _use_p2p(force_port: bool) -> bool:
    """Direct peer access instead of communicators (no channel layer, or JMEP_LL_P2P=1)."""
    if os.environ.get("JMEP_LL_P2P", "0") not in ("", "0"):
        return True
    if _ep.ll_has_channels():
        try:
            from . import channels  # noqa: F401
            return False
        except ImportError:
            pass
    if force_port:
        raise RuntimeError("force_port needs the channel layer, which this build lacks")
    return True


def validate(config: cfg.EPConfig, devices) -> None:
    """What Buffer(...) checks on GPUs before it takes an id: the kernels support the
    config's hidden size and this process's GPUs can run the compiled kernels."""
    _check_hidden(config.hidden)
    arch.check_devices(devices)


def attach(buffer, devices, num_ranks: int) -> GpuState:
    """Create the communicators and LL state of ``buffer`` on this process's GPUs
    (after ``validate``)."""
    c = buffer.config
    force_port = _env_force_port() if buffer.force_port is None else bool(buffer.force_port)
    devices = list(devices)
    local = [d for d in devices if d.process_index == jax.process_index()]
    if _use_p2p(force_port):
        if jax.process_count() > 1 or len(local) != len(devices):
            raise RuntimeError("without the channel layer, one process must drive every GPU of the "
                               "EP group")
        ordinals = [d.local_hardware_id for d in devices]
        timeout = buffer.timeout_s if buffer.timeout_s is not None else float(
            os.environ.get("JMEP_TIMEOUT_S", cfg.DEFAULT_TIMEOUT_S))
        _ep.ll_register_p2p(buffer.id, ordinals, c.max_tokens_per_rank, c.hidden, c.num_experts,
                            float(timeout))
        return GpuState(buffer.id, [], ordinals)

    from . import channels
    comms = channels.create_communicators(
        c.size_hint(num_ranks), devices=devices, force_port=force_port,
        timeout_s=buffer.timeout_s, namespace=f"jmep_ll_{buffer.id}", host_id=buffer.host_id)
    ordinals = []
    try:
        for i, comm in enumerate(comms):
            fallback = local[i].local_hardware_id if i < len(local) else i
            dev = _comm_device(comm, fallback)
            _ep.ll_register(buffer.id, comm, c.max_tokens_per_rank, c.hidden, c.num_experts)
            ordinals.append(dev)
    except BaseException:
        for dev in ordinals:
            _ep.ll_unregister(buffer.id, dev)
        raise
    # No rank may signal a peer before the peer's signal words are zeroed.
    _barrier(f"jmep_ll_{buffer.id}_registered")
    return GpuState(buffer.id, comms, ordinals)


from . import gpu_bwd  # noqa: E402,F401  (combine's backward on the kernels)
