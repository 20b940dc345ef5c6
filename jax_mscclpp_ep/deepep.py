"""DeepEP's low-latency API on a Buffer: DeepEP's names, argument order and result order.

For code moving from DeepEP v1 (``deep_ep.Buffer``)::

    recv_x, recv_count, handle, event, hook = buf.low_latency_dispatch(
        x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8=True)
    combined_x, event, hook = buf.low_latency_combine(y, topk_idx, topk_weights, handle)

Each method translates to ``dispatch`` / ``combine`` (or, with ``return_recv_hook=True``,
to the split halves in ``split.py``) and returns DeepEP's tuple. What differs, because
these are JAX arrays inside a traced function:

- No events: ``event`` is always None. XLA orders the calls; where two calls on one
  Buffer have no data dependence, pass ``after=`` (the earlier call's handle or order
  token, ``results.order``), as with the plain API.
- Nothing is updated in place: the updated ``cumulative_local_expert_recv_stats`` comes
  back as ``results.stats``; combine has no ``out=`` and no ``zero_copy``.
- ``return_recv_hook=True``: the send half runs at the call and the returned data slots
  are None; ``hook()`` runs the receive half and returns the data (dispatch:
  ``(recv_x, recv_count, handle)`` with ``.stats``; combine: ``combined_x``). Call the
  hook exactly as DeepEP requires (once, before the Buffer's next call), inside the same
  traced function.
- ``handle`` is a ``DispatchHandle`` (src_info, layout_range, order), not DeepEP's tuple.
- fp8 scales are row-major ``[LE, R*M, H/128]`` (DeepEP stores them column-major for
  TMA: same values); ``use_ue8m0`` packs them as DeepEP does, four exponent bytes per
  int32, ``[LE, R*M, ceil(H/512)]`` (``unpack_ue8m0`` gives the f32 scales back).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from . import api, split
from . import config as cfg
from .buffer import Buffer


class Results(tuple):
    """DeepEP's results in DeepEP's order (unpack it as a tuple), plus what DeepEP
    would have written in place or signalled by event:

    - ``stats``: ``cumulative_local_expert_recv_stats + recv_count`` (None without stats);
    - ``order``: the call's order token, for ``after=`` of a call that must follow it.
    """

    def __new__(cls, items, stats=None, order=None):
        self = super().__new__(cls, items)
        self.stats, self.order = stats, order
        return self


jax.tree_util.register_pytree_node(
    Results, lambda r: (tuple(r) + (r.stats, r.order), len(r)),
    lambda n, ch: Results(ch[:n], ch[n], ch[n + 1]))


class RecvHook:
    """DeepEP's receive hook: calling it runs the receive half and returns its data.

    A second call returns the first call's results (the receive half runs once);
    ``order`` is the receive half's order token once the hook has run.
    """

    def __init__(self, receive):
        self._receive, self._out, self.order = receive, None, None

    def __call__(self):
        if self._receive is not None:
            self._out, self.order = self._receive()
            self._receive = None
        return self._out


def _config_of(buffer) -> cfg.EPConfig:
    if isinstance(buffer, Buffer):
        return buffer.config
    if isinstance(buffer, cfg.EPConfig):
        return buffer
    raise TypeError(f"expected a jax_mscclpp_ep.Buffer or EPConfig, got {type(buffer).__name__}")


def check_shapes(config: cfg.EPConfig, num_max_dispatch_tokens_per_rank: int,
                 num_experts: int) -> None:
    """DeepEP passes M and E on every call; here the Buffer fixes them (its layout and
    size follow from them), so the call's values must be the Buffer's."""
    if int(num_max_dispatch_tokens_per_rank) != config.max_tokens_per_rank:
        raise ValueError(
            f"low_latency_dispatch: num_max_dispatch_tokens_per_rank={num_max_dispatch_tokens_per_rank} "
            f"but the Buffer was created with max_tokens_per_rank={config.max_tokens_per_rank} "
            "(the receive layout has R*M rows per expert): pass the Buffer's value or create the "
            "Buffer with EPConfig(max_tokens_per_rank=...)")
    if int(num_experts) != config.num_experts:
        raise ValueError(
            f"low_latency_dispatch: num_experts={num_experts} but the Buffer was created with "
            f"num_experts={config.num_experts}: pass the Buffer's value or create the Buffer with "
            "EPConfig(num_experts=...)")


def pack_ue8m0(scales) -> jax.Array:
    """f32 power-of-two scales [..., S] -> int32 [..., ceil(S/4)]: each scale's exponent
    byte (UE8M0), scale 4p+i in byte i of int32 p (DeepEP's packing)."""
    exp = (lax.bitcast_convert_type(scales.astype(jnp.float32), jnp.uint32) >> 23) & 0xFF
    pad = -scales.shape[-1] % 4
    exp = jnp.pad(exp, [(0, 0)] * (exp.ndim - 1) + [(0, pad)])
    exp = exp.reshape(exp.shape[:-1] + (exp.shape[-1] // 4, 4))
    packed = sum(exp[..., i] << (8 * i) for i in range(4))
    return lax.bitcast_convert_type(packed.astype(jnp.uint32), jnp.int32)


def unpack_ue8m0(packed, num_scales: int) -> jax.Array:
    """Inverse of ``pack_ue8m0``: int32 [..., P] -> f32 scales [..., num_scales]."""
    bits = lax.bitcast_convert_type(packed, jnp.uint32)
    exp = jnp.stack([(bits >> (8 * i)) & 0xFF for i in range(4)], axis=-1)
    exp = exp.reshape(exp.shape[:-2] + (-1,))[..., :num_scales]
    return lax.bitcast_convert_type(exp << 23, jnp.float32)


def _dispatch_results(res: api.DispatchResult, use_fp8: bool, use_ue8m0: bool) -> Results:
    if use_fp8:
        scales = pack_ue8m0(res.recv_scales) if use_ue8m0 else res.recv_scales
        recv_x = (res.recv_x, scales)
    else:
        recv_x = res.recv_x
    return Results((recv_x, res.recv_count, res.handle), stats=res.stats, order=res.handle.order)


def low_latency_dispatch(buffer, x, topk_idx, num_max_dispatch_tokens_per_rank: int,
                         num_experts: int, cumulative_local_expert_recv_stats=None,
                         dispatch_wait_recv_cost_stats=None, use_fp8: bool = True,
                         round_scale: bool = False, use_ue8m0: bool = False,
                         async_finish: bool = False, return_recv_hook: bool = False, *,
                         after=None) -> Results:
    """DeepEP's ``Buffer.low_latency_dispatch`` (v1): ``(recv_x, recv_count, handle, event, hook)``.

    recv_x: ``(fp8 [LE, R*M, H], scales)`` with use_fp8 (scales f32 [LE, R*M, H/128], or
    UE8M0-packed int32 with use_ue8m0), else bf16 [LE, R*M, H]; recv_count [LE] int32;
    handle: for ``low_latency_combine``; event: None; hook: None, or with return_recv_hook
    a ``RecvHook`` returning ``(recv_x, recv_count, handle)`` (then the first three are
    None). ``.stats`` of the results (or of the hook's) is the updated
    cumulative_local_expert_recv_stats. async_finish changes nothing (XLA schedules the
    kernels); dispatch_wait_recv_cost_stats is not offered. Call inside shard_map.
    """
    config = _config_of(buffer)
    check_shapes(config, num_max_dispatch_tokens_per_rank, num_experts)
    if dispatch_wait_recv_cost_stats is not None:
        raise NotImplementedError("low_latency_dispatch: dispatch_wait_recv_cost_stats is not "
                                  "offered (the kernels do not time each peer's wait); pass None")
    if use_ue8m0 and not (use_fp8 and round_scale):
        raise ValueError("low_latency_dispatch: use_ue8m0=True needs use_fp8=True and "
                         "round_scale=True (UE8M0 holds only powers of two)")
    del async_finish  # no stream to return to early: XLA already runs the call asynchronously
    kw = dict(use_fp8=use_fp8, round_scale=round_scale, stats=cumulative_local_expert_recv_stats,
              after=after)
    if not return_recv_hook:
        res = api.dispatch(x, topk_idx, buffer, **kw)
        out = _dispatch_results(res, use_fp8, use_ue8m0)
        return Results(tuple(out) + (None, None), stats=out.stats, order=out.order)
    pending = split.dispatch_send(x, topk_idx, buffer, **kw)

    def receive():
        out = _dispatch_results(split.dispatch_recv(pending), use_fp8, use_ue8m0)
        return out, out.order

    return Results((None, None, None, None, RecvHook(receive)))


def low_latency_combine(buffer, x, topk_idx, topk_weights, handle: api.DispatchHandle,
                        use_logfmt: bool = False, zero_copy: bool = False,
                        async_finish: bool = False, return_recv_hook: bool = False, out=None,
                        combine_wait_recv_cost_stats=None) -> Results:
    """DeepEP's ``Buffer.low_latency_combine`` (v1): ``(combined_x, event, hook)``.

    x: [LE, R*M, H] bf16 expert outputs in dispatch's layout; topk_idx / topk_weights
    [T, K] as given to dispatch; handle from ``low_latency_dispatch``. combined_x: [T, H]
    bf16; event: None; hook: None, or with return_recv_hook a ``RecvHook`` returning
    combined_x (then combined_x is None). The ordering dependency that
    ``handle`` carries is followed; ``.order`` of the results (``hook.order``) is the
    call's order token. Not offered: use_logfmt, zero_copy, out (JAX arrays are
    immutable), combine_wait_recv_cost_stats.
    """
    if use_logfmt:
        raise NotImplementedError("low_latency_combine: use_logfmt is not offered; combine "
                                  "sends bf16 rows")
    if zero_copy:
        raise NotImplementedError("low_latency_combine: zero_copy is not offered: "
                                  + _NO_COMBINE_BUFFER)
    if out is not None:
        raise NotImplementedError("low_latency_combine: out= is not offered: JAX arrays are "
                                  "immutable; use the returned combined_x")
    if combine_wait_recv_cost_stats is not None:
        raise NotImplementedError("low_latency_combine: combine_wait_recv_cost_stats is not "
                                  "offered (the kernels do not time each peer's wait); pass None")
    del async_finish  # as in low_latency_dispatch
    if not return_recv_hook:
        combined_x, order = api.combine(x, topk_idx, topk_weights, handle, buffer,
                                        return_order=True)
        return Results((combined_x, None, None), order=order)
    pending = split.combine_send(x, topk_idx, topk_weights, handle, buffer)
    return Results((None, None, RecvHook(lambda: split.combine_recv(pending, return_order=True))))


def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int,
                                   num_ranks: int, num_experts: int) -> int:
    """DeepEP's size hint: the bytes of the communication buffer per rank (``size_hint``).
    A Buffer allocates this itself; the figure is for capacity planning."""
    return cfg.size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)


_NO_COMBINE_BUFFER = (
    "DeepEP hands out its registered buffer as a tensor for the caller to fill in place; "
    "in JAX arrays are immutable and XLA decides where the expert outputs live, so the "
    "buffer cannot be given out as an array to write. combine copies y into the buffer "
    "inside its send kernel instead: pass the expert outputs to low_latency_combine")


def get_next_low_latency_combine_buffer(buffer, handle: Optional[api.DispatchHandle] = None):
    """Not offered (DeepEP's zero-copy combine): raises NotImplementedError saying why."""
    del buffer, handle
    raise NotImplementedError("get_next_low_latency_combine_buffer: " + _NO_COMBINE_BUFFER)


# Buffer's DeepEP-named methods live here, not in buffer.py: this module needs api,
# which imports buffer, so buffer.py cannot import it (no import cycle).
Buffer.low_latency_dispatch = low_latency_dispatch
Buffer.low_latency_combine = low_latency_combine
Buffer.get_low_latency_rdma_size_hint = staticmethod(get_low_latency_rdma_size_hint)
Buffer.get_next_low_latency_combine_buffer = get_next_low_latency_combine_buffer
