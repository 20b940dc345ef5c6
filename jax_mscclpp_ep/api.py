"""Public dispatch / combine: argument checks at trace time, then the primitives.

Both are differentiable (``autodiff.py``): jax.grad / value_and_grad /
checkpoint work through them under jit and shard_map.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
from jax import lax

from . import config as cfg
from .buffer import Buffer
from . import ids
from .ids import invalid_ids  # noqa: F401  (public; the package exports it from here)
from .autodiff import dispatch_dequantized  # also registers the derivative rules
from .exchanges import combine_p, dispatch_p


class DispatchHandle(NamedTuple):
    """What combine needs from dispatch (a pytree; pass it through jit/scan freely)."""
    src_info: jax.Array      # [LE, R*M] int32: token index of each row on its source rank
    layout_range: jax.Array  # int64[LE, R] = (offset << 32) | count, or int32[LE, R, 2] without x64
    order: jax.Array         # int32 scalar ordering token


class DispatchResult(NamedTuple):
    recv_x: jax.Array                 # [LE, R*M, H] bf16, or float8_e4m3fn with use_fp8
    recv_scales: Optional[jax.Array]  # [LE, R*M, H/128] f32 with use_fp8, else None
    recv_count: jax.Array             # [LE] int32: valid rows per local expert (packed at the front)
    handle: DispatchHandle
    stats: Optional[jax.Array]        # stats + recv_count when stats were given, else None


BufferOrConfig = Union[Buffer, cfg.EPConfig]

# Default axis: the buffer's (an EPConfig's default is "ep"); None = one rank, no axis.
BUFFER_AXIS = "__buffer_axis__"


def resolve(buffer: BufferOrConfig, axis_name):
    """(config, axis_name, buffer_id, masked) from a Buffer or a bare EPConfig (CPU only)."""
    if isinstance(buffer, Buffer):
        buffer.check_open()
        axis_name = buffer.axis_name if axis_name == BUFFER_AXIS else axis_name
        return buffer.config, axis_name, buffer.id, buffer.trace_mask()
    if isinstance(buffer, cfg.EPConfig):
        return buffer, ("ep" if axis_name == BUFFER_AXIS else axis_name), -1, ()
    raise TypeError(f"expected a jax_mscclpp_ep.Buffer or EPConfig, got {type(buffer).__name__}")


def axis_ranks(axis_name) -> int:
    if axis_name is None:
        return 1
    try:
        return int(lax.axis_size(axis_name))
    except NameError as e:
        raise NameError(
            f"EP axis {axis_name!r} is not bound: call dispatch/combine inside "
            f"jax.shard_map over a mesh with axis {axis_name!r}, or pass axis_name=None "
            "for a single rank") from e


def check_mesh(buffer, num_ranks):
    if isinstance(buffer, Buffer) and buffer.num_ranks != num_ranks:
        raise ValueError(
            f"{buffer!r} was created for an EP group of {buffer.num_ranks} ranks but is used on an "
            f"axis of size {num_ranks}")


def order_from(after) -> jax.Array:
    if after is None:
        return jnp.zeros((), jnp.int32)
    if isinstance(after, DispatchHandle):
        return after.order
    if isinstance(after, DispatchResult):
        return after.handle.order
    order = jnp.asarray(after)
    if order.shape != () or order.dtype != jnp.int32:
        raise TypeError("after= takes a DispatchHandle, a DispatchResult or an int32 order token")
    return order


def exchange_params(buffer, axis_name) -> tuple:
    """Trace-time checks every exchange makes: (config, the params every exchange carries)."""
    config, axis_name, buffer_id, masked = resolve(buffer, axis_name)
    num_ranks = axis_ranks(axis_name)
    check_mesh(buffer, num_ranks)
    return config, dict(num_experts=config.num_experts, max_tokens=config.max_tokens_per_rank,
                        num_ranks=num_ranks, axis_name=axis_name, buffer_id=int(buffer_id),
                        masked=tuple(masked))


def dispatch_params(x, topk_idx, buffer, axis_name, use_fp8, round_scale, stats, check_ids,
                    what: str):
    """Trace-time checks of dispatch and dispatch_send: (primitive params, stats_in)."""
    config, params = exchange_params(buffer, axis_name)
    num_ranks = params["num_ranks"]
    if round_scale and not use_fp8:
        raise ValueError("round_scale=True needs use_fp8=True")
    cfg.check_dispatch_args(config, num_ranks, x, topk_idx, stats, use_fp8)
    if check_ids:
        ids.check_ids(topk_idx, config.num_experts, params["axis_name"], what)
    le = config.num_experts // num_ranks
    stats_in = jnp.zeros((le,), jnp.int32) if stats is None else stats
    return dict(params, use_fp8=bool(use_fp8), round_scale=bool(round_scale)), stats_in


def combine_params(y, topk_idx, topk_weights, handle, buffer, axis_name) -> dict:
    """Trace-time checks of combine and combine_send: the primitive params."""
    config, params = exchange_params(buffer, axis_name)
    if not isinstance(handle, DispatchHandle):
        raise TypeError(f"handle must be the DispatchHandle returned by dispatch, got "
                        f"{type(handle).__name__}")
    cfg.check_combine_args(config, params["num_ranks"], y, topk_idx, topk_weights,
                           handle.src_info, handle.layout_range)
    return params


def dispatch(x, topk_idx, buffer: BufferOrConfig, *, axis_name: Optional[str] = BUFFER_AXIS,
             use_fp8: bool = False, round_scale: bool = False, stats=None,
             after=None, dequantize: bool = False, check_ids: bool = False) -> DispatchResult:
    """Send each token to the ranks holding its top-k experts (the LL contract).

    x: [T, H] bf16 (T <= M); topk_idx: [T, K] int32/int64, -1 = no expert.
    buffer: a Buffer (required on GPU) or an EPConfig (CPU reference path).
    Call inside jax.shard_map over the EP axis (default: the buffer's, "ep");
    axis_name=None runs a single rank without collectives.
    stats: optional int32 [LE] running counter; the result's ``stats`` is
    stats + recv_count. after: a handle/result/order token this call must follow.
    dequantize: with use_fp8, return recv_x already dequantised to bf16 (recv_scales
    are still returned); the form to differentiate, its backward treating the fp8
    cast as identity.
    check_ids: add a ``jax.experimental.checkify`` check that every expert id lies in
    [-1, E); wrap the caller in ``checkify.checkify(f, errors=checkify.user_checks)``
    (without that wrapper, staging the check is an error). Without it, bad ids are
    dropped and counted (``Buffer.dropped_ids``, ``invalid_ids``).
    Differentiable w.r.t. x: the backward pass brings each row's cotangent back to
    its token and sums over the token's experts.
    """
    params, stats_in = dispatch_params(x, topk_idx, buffer, axis_name, use_fp8, round_scale,
                                          stats, check_ids, "dispatch")
    if dequantize and not use_fp8:
        raise ValueError("dequantize=True needs use_fp8=True")
    bind = dispatch_dequantized if dequantize else dispatch_p.bind
    outs = bind(x, topk_idx, stats_in, order_from(after), **params)
    recv_x, recv_scales, recv_count, src_info, layout_range, stats_out, order = outs
    return DispatchResult(recv_x, recv_scales if use_fp8 else None, recv_count,
                          DispatchHandle(src_info, layout_range, order),
                          stats_out if stats is not None else None)


def combine(y, topk_idx, topk_weights, handle: DispatchHandle, buffer: BufferOrConfig, *,
            axis_name: Optional[str] = BUFFER_AXIS, return_order: bool = False):
    """Bring expert outputs back and reduce them with the top-k weights.

    y: [LE, R*M, H] bf16 (rows as dispatch delivered them); topk_idx/topk_weights:
    [T, K] as given to dispatch (weights f32). Returns out [T, H] bf16 with
    out[t] = sum_k w[t,k] * y[row of (t, idx[t,k])], accumulated in f32; with
    return_order also the order token for a later call to follow.
    Differentiable w.r.t. y and topk_weights.
    """
    params = combine_params(y, topk_idx, topk_weights, handle, buffer, axis_name)
    out, order = combine_p.bind(y, topk_idx, topk_weights, handle.src_info, handle.layout_range,
                                handle.order, **params)
    return (out, order) if return_order else out
