"""Split dispatch / combine: a send half and a receive half (DeepEP's receive hook).

    pending = dispatch_send(x, topk_idx, buf)      # data leaves; returns at once
    ...other work (the other micro-batch's experts)...
    res = dispatch_recv(pending)                   # waits for the peers, lays rows out

and the same for combine (``combine_send`` / ``combine_recv``). Each half is its
own custom call, so XLA can place independent work between them; with two
micro-batches on two Buffers, one's communication overlaps the other's compute.
Results are exactly those of ``dispatch`` / ``combine``.

Rules: between a send half and its receive half nothing else may use the same
Buffer (use one Buffer per micro-batch). The halves are differentiable like the
whole calls (the backward pass runs whole-call exchanges, not split ones). On
CPU the send half only passes the order token on and the receive half runs the
whole reference exchange.
"""

from __future__ import annotations

from typing import Optional

import jax

from . import api
from .exchanges import combine_recv_p, combine_send_p, dispatch_recv_p, dispatch_send_p


@jax.tree_util.register_pytree_node_class
class PendingDispatch:
    """What ``dispatch_recv`` needs: the call's arrays (pytree children) and its static
    parameters (aux data), so it can cross ``jit``/``scan`` boundaries."""

    def __init__(self, arrays, params):
        self.arrays, self.params = tuple(arrays), params

    def tree_flatten(self):
        return self.arrays, self.params

    @classmethod
    def tree_unflatten(cls, params, arrays):
        return cls(arrays, params)


@jax.tree_util.register_pytree_node_class
class PendingCombine(PendingDispatch):
    """What ``combine_recv`` needs (see PendingDispatch)."""


def dispatch_send(x, topk_idx, buffer, *, axis_name: Optional[str] = api.BUFFER_AXIS,
                  use_fp8: bool = False, round_scale: bool = False, stats=None,
                  after=None, check_ids: bool = False) -> PendingDispatch:
    """Send half of ``dispatch`` (same arguments): returns a PendingDispatch."""
    params, stats_in = api.dispatch_params(x, topk_idx, buffer, axis_name, use_fp8,
                                              round_scale, stats, check_ids, "dispatch_send")
    (order,) = dispatch_send_p.bind(x, topk_idx, api.order_from(after), **params)
    return PendingDispatch((x, topk_idx, stats_in, order),
                           (tuple(sorted(params.items())), stats is not None))


def dispatch_recv(pending: PendingDispatch) -> api.DispatchResult:
    """Receive half of ``dispatch``: the DispatchResult the whole call would give."""
    if type(pending) is not PendingDispatch:
        raise TypeError(f"dispatch_recv takes what dispatch_send returned, got {type(pending).__name__}")
    items, has_stats = pending.params
    params = dict(items)
    outs = dispatch_recv_p.bind(*pending.arrays, **params)
    recv_x, recv_scales, recv_count, src_info, layout_range, stats_out, order = outs
    return api.DispatchResult(recv_x, recv_scales if params["use_fp8"] else None, recv_count,
                              api.DispatchHandle(src_info, layout_range, order),
                              stats_out if has_stats else None)


def combine_send(y, topk_idx, topk_weights, handle: api.DispatchHandle, buffer, *,
                 axis_name: Optional[str] = api.BUFFER_AXIS) -> PendingCombine:
    """Send half of ``combine`` (same arguments): returns a PendingCombine."""
    params = api.combine_params(y, topk_idx, topk_weights, handle, buffer, axis_name)
    (order,) = combine_send_p.bind(y, handle.src_info, handle.layout_range, handle.order,
                                   **params)
    return PendingCombine((y, topk_idx, topk_weights, handle.src_info, handle.layout_range,
                           order), tuple(sorted(params.items())))


def combine_recv(pending: PendingCombine, *, return_order: bool = False):
    """Receive half of ``combine``: out [T, H] bf16 (and the order token if asked)."""
    if type(pending) is not PendingCombine:
        raise TypeError(f"combine_recv takes what combine_send returned, got {type(pending).__name__}")
    out, order = combine_recv_p.bind(*pending.arrays, **dict(pending.params))
    return (out, order) if return_order else out
