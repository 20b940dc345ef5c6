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

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from . import api, autodiff
from . import config as cfg
from .primitives import (_aval_maker, _apply_primitive, _batched_loop, _combine_abstract,
                         _combine_reference, _dispatch_abstract, _dispatch_reference)

dispatch_send_p = Primitive("jax_mscclpp_ep_dispatch_send")
dispatch_recv_p = Primitive("jax_mscclpp_ep_dispatch_recv")
combine_send_p = Primitive("jax_mscclpp_ep_combine_send")
combine_recv_p = Primitive("jax_mscclpp_ep_combine_recv")
SPLIT_PRIMITIVES = (dispatch_send_p, dispatch_recv_p, combine_send_p, combine_recv_p)

for _p in SPLIT_PRIMITIVES:
    _p.multiple_results = True
    _p.def_impl(functools.partial(_apply_primitive, _p))
    batching.primitive_batchers[_p] = functools.partial(_batched_loop, _p)


@dispatch_send_p.def_abstract_eval
def _dispatch_send_abstract(x, topk_idx, order, *, axis_name, **_):
    return (_aval_maker(axis_name, x, topk_idx, order)((), jnp.int32),)


@combine_send_p.def_abstract_eval
def _combine_send_abstract(y, src_info, layout_range, order, *, axis_name, **_):
    return (_aval_maker(axis_name, y, src_info, layout_range, order)((), jnp.int32),)


# The receive halves take the whole call's operands (the CPU reference needs them;
# the GPU kernels ignore what was already sent) and give its outputs.
dispatch_recv_p.def_abstract_eval(_dispatch_abstract)
combine_recv_p.def_abstract_eval(_combine_abstract)


def _pass_order(*args, **_):
    return (args[-1],)


for _p, _fn in ((dispatch_send_p, _pass_order), (combine_send_p, _pass_order),
                (dispatch_recv_p, _dispatch_reference), (combine_recv_p, _combine_reference)):
    mlir.register_lowering(_p, mlir.lower_fun(_fn, multiple_results=True), platform="cpu")


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
    params, stats_in = api._dispatch_prologue(x, topk_idx, buffer, axis_name, use_fp8,
                                              round_scale, stats, check_ids, "dispatch_send")
    (order,) = dispatch_send_p.bind(x, topk_idx, api._order_from(after), **params)
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
    config, axis_name, buffer_id = api._resolve(buffer, axis_name)
    num_ranks = api._num_ranks(axis_name)
    api._check_mesh(buffer, num_ranks)
    if not isinstance(handle, api.DispatchHandle):
        raise TypeError(f"handle must be the DispatchHandle returned by dispatch, got "
                        f"{type(handle).__name__}")
    cfg.check_combine_args(config, num_ranks, y, topk_idx, topk_weights, handle.src_info,
                           handle.layout_range)
    params = dict(num_experts=config.num_experts, max_tokens=config.max_tokens_per_rank,
                  num_ranks=num_ranks, axis_name=axis_name, buffer_id=int(buffer_id))
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


# ---------------------------------------------------------------- derivatives
# A send half only yields the order token (no tangent); its receive half takes
# the whole call's operands, so it differentiates like the whole call. The
# tangents are whole-call exchanges (run after the receive half, on the same
# Buffer), so a backward pass does not overlap; the forward keeps its split.

def _send_jvp(prim, primals, tangents, **params):
    del tangents
    outs = prim.bind(*primals, **params)
    return outs, [autodiff._zero_like(o) for o in outs]


ad.primitive_jvps[dispatch_send_p] = functools.partial(_send_jvp, dispatch_send_p)
ad.primitive_jvps[combine_send_p] = functools.partial(_send_jvp, combine_send_p)
ad.primitive_jvps[dispatch_recv_p] = functools.partial(autodiff._dispatch_jvp, prim=dispatch_recv_p)
ad.primitive_jvps[combine_recv_p] = functools.partial(autodiff._combine_jvp, prim=combine_recv_p)
