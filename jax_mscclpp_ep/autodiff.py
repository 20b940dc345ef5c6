"""Derivatives of the exchange primitives: JVP and transpose rules, mirror exchanges.

Registered on the primitives themselves (no custom_vjp wrapper), so a program
that is not differentiated keeps exactly its dispatch_p/combine_p calls, and
jax.grad / value_and_grad / jvp / linearize / checkpoint all work under jit
and shard_map. Every derivative is again one of the exchange primitives, so
the GPU kernels serve the backward pass too.

- dispatch (x -> rows) is linear in x. Its tangent is ``scatter_to_rows_p``
  of the x-tangent with weight 1 on the slots that sent a message (first
  occurrence of an in-range expert): the same rows the forward handle names,
  whatever order the kernels chose. Transposed, that is ``combine_p`` with
  the same weights: each row's cotangent goes back to its token and is
  summed over the token's experts.
- combine is bilinear in (y, topk_weights). Transposed w.r.t. y it is
  ``scatter_to_rows_p`` (w-weighted cotangent to the rows of the handle),
  w.r.t. topk_weights it is <g[t], row(t,k)> with the rows brought back by
  ``gather_rows_p``.
- fp8: the cast is identity in the derivative (straight-through) and the
  scales are constants. A raw fp8 recv_x q = x/scale gets tangent t/scale in
  e4m3 (so its cotangent carries e4m3 rounding); ``dispatch_dequantized``
  returns bf16 values whose derivative is exactly the bf16 dispatch's.
- topk_idx, stats, handle and order tokens are integers: zero (float0) tangents.
- Split halves: a send half has zero tangents; a receive half differentiates like
  the whole call.
- No second derivatives through ``gather_rows_p`` (w.r.t. y).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.interpreters import ad

from . import reference
from .declare import EXCHANGE_PARAMS
from .exchanges import (combine_p, combine_recv_p, combine_send_p, dispatch_p, dispatch_recv_p,
                        dispatch_send_p, gather_rows_p, scatter_to_rows_p)


def _xparams(params: dict) -> dict:
    return {k: params[k] for k in EXCHANGE_PARAMS if k in params}  # masked may be left out


_typeof = getattr(jax, "typeof", None) or jax.core.get_aval  # jax.typeof since 0.6


def _zero_like(v):
    return ad.Zero(_typeof(v).to_tangent_aval())


def _is_zero(t) -> bool:
    return type(t) is ad.Zero


def _sent_weights(topk_idx, num_experts):
    return reference.valid_slots(topk_idx, num_experts).astype(jnp.float32)


def _scale_rows(rows, recv_scales, inverse: bool):
    """rows [..., H] times (or divided by) per-128 scales; 0 where a scale is 0 (rows not sent)."""
    s = recv_scales
    if inverse:
        s = jnp.where(s > 0, 1.0 / jnp.where(s > 0, s, 1.0), 0.0)
    return reference.dequantize(rows.astype(jnp.float32), s)


# ---------------------------------------------------------------- dispatch

def _dispatch_jvp(primals, tangents, prim=dispatch_p, **params):
    x, topk_idx, _, _ = primals
    outs = prim.bind(*primals, **params)
    recv_x, recv_scales, _, src_info, layout_range, _, order = outs
    t_out = [_zero_like(o) for o in outs]
    if not _is_zero(tangents[0]):
        tx = ad.instantiate_zeros(tangents[0]).astype(jnp.bfloat16)
        rows, _ = scatter_to_rows_p.bind(tx, topk_idx, _sent_weights(topk_idx, params["num_experts"]),
                                         src_info, layout_range, order, **_xparams(params))
        if params["use_fp8"]:
            rows = _scale_rows(rows, recv_scales, inverse=True)
        t_out[0] = rows.astype(recv_x.dtype)
    return outs, t_out


def dispatch_dequantized(x, topk_idx, stats, order, **params):
    """dispatch_p (use_fp8) with recv_x dequantised to bf16; derivative = the bf16 dispatch's."""
    outs = dispatch_p.bind(x, topk_idx, stats, order, **params)
    q, scales = lax.stop_gradient(outs[0]), lax.stop_gradient(outs[1])

    @jax.custom_jvp
    def dequantized(x, q, scales, topk_idx, src_info, layout_range, order):
        del x  # the value comes from q and scales; x only carries the derivative
        return reference.dequantize(q, scales).astype(jnp.bfloat16)

    @dequantized.defjvp
    def _jvp(primals, tangents):
        _, _, _, topk_idx, src_info, layout_range, order = primals
        rows, _ = scatter_to_rows_p.bind(
            tangents[0].astype(jnp.bfloat16), topk_idx,
            _sent_weights(topk_idx, params["num_experts"]), src_info, layout_range, order,
            **_xparams(params))
        return dequantized(*primals), rows

    v = dequantized(x, q, scales, topk_idx, outs[3], outs[4], outs[6])
    return (v, *outs[1:])


# ---------------------------------------------------------------- combine

def _combine_jvp(primals, tangents, prim=combine_p, **params):
    y, topk_idx, topk_weights, src_info, layout_range, _ = primals
    ty, _, tw = tangents[0], tangents[1], tangents[2]
    out, order = prim.bind(*primals, **params)
    t = None
    if not _is_zero(ty):
        t = combine_p.bind(ad.instantiate_zeros(ty), topk_idx, topk_weights, src_info,
                           layout_range, order, **params)[0]
    if not _is_zero(tw):
        t2 = combine_p.bind(y, topk_idx, ad.instantiate_zeros(tw), src_info, layout_range, order,
                            **params)[0]
        t = t2 if t is None else t + t2
    return (out, order), [_zero_like(out) if t is None else t, _zero_like(order)]


def _combine_transpose(cts, y, topk_idx, topk_weights, src_info, layout_range, order, **params):
    ct = cts[0]
    res = [None] * 6
    if _is_zero(ct):
        return res
    ct = ct.astype(jnp.bfloat16)
    if ad.is_undefined_primal(y):
        gy, _ = scatter_to_rows_p.bind(ct, topk_idx, topk_weights, src_info, layout_range, order,
                                       **params)
        res[0] = gy.astype(y.aval.dtype)
    if ad.is_undefined_primal(topk_weights):
        rows, _ = gather_rows_p.bind(y, topk_idx, src_info, layout_range, order, **params)
        res[2] = _row_dots(rows, ct, topk_idx, params["num_experts"])
    return res


def _row_dots(rows, g, topk_idx, num_experts):
    """[T, K] f32: <g[t], rows[t, k]> on the slots combine uses, 0 elsewhere."""
    gw = jnp.einsum("tkh,th->tk", rows.astype(jnp.float32), g.astype(jnp.float32))
    return jnp.where(reference.combine_slots(topk_idx, num_experts), gw, 0.0)


# ---------------------------------------------------------------- scatter_to_rows (bilinear in g, w)

def _scatter_jvp(primals, tangents, **params):
    g, topk_idx, w, src_info, layout_range, _ = primals
    tg, tw = tangents[0], tangents[2]
    rows, order = scatter_to_rows_p.bind(*primals, **params)
    t = None
    if not _is_zero(tg):
        t = scatter_to_rows_p.bind(ad.instantiate_zeros(tg), topk_idx, w, src_info, layout_range,
                                   order, **params)[0]
    if not _is_zero(tw):
        t2 = scatter_to_rows_p.bind(g, topk_idx, ad.instantiate_zeros(tw), src_info, layout_range,
                                    order, **params)[0]
        t = t2 if t is None else t + t2
    return (rows, order), [_zero_like(rows) if t is None else t, _zero_like(order)]


def _scatter_transpose(cts, g, topk_idx, w, src_info, layout_range, order, **params):
    ct = cts[0]
    res = [None] * 6
    if _is_zero(ct):
        return res
    ct = ct.astype(jnp.bfloat16)
    if ad.is_undefined_primal(g):
        res[0] = combine_p.bind(ct, topk_idx, w, src_info, layout_range, order,
                                **params)[0].astype(g.aval.dtype)
    if ad.is_undefined_primal(w):
        rows, _ = gather_rows_p.bind(ct, topk_idx, src_info, layout_range, order, **params)
        res[2] = _row_dots(rows, g, topk_idx, params["num_experts"])
    return res


# ---------------------------------------------------------------- split halves
# A send half only yields the order token (no tangent); its receive half takes the
# whole call's operands, so it differentiates like the whole call. The tangents are
# whole-call exchanges (run after the receive half, on the same Buffer), so a
# backward pass does not overlap; the forward keeps its split.

def _send_jvp(primals, tangents, *, prim, **params):
    del tangents
    outs = prim.bind(*primals, **params)
    return outs, [_zero_like(o) for o in outs]


ad.primitive_jvps[dispatch_p] = _dispatch_jvp
ad.primitive_jvps[dispatch_recv_p] = functools.partial(_dispatch_jvp, prim=dispatch_recv_p)
ad.primitive_jvps[combine_p] = _combine_jvp
ad.primitive_jvps[combine_recv_p] = functools.partial(_combine_jvp, prim=combine_recv_p)
ad.primitive_transposes[combine_p] = _combine_transpose
ad.primitive_jvps[scatter_to_rows_p] = _scatter_jvp
ad.primitive_transposes[scatter_to_rows_p] = _scatter_transpose
for _p in (dispatch_send_p, combine_send_p):
    ad.primitive_jvps[_p] = functools.partial(_send_jvp, prim=_p)
