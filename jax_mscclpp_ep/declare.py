"""How an exchange primitive is declared, and everything JAX needs registered for it.

An exchange is a collective call over the EP axis on one Buffer. Its declaration
(``Exchange``) says once: the primitive's name, its abstract eval, its pure-JAX
reference (the CPU lowering and the test oracle), its CUDA custom-call target and
which operands the custom call aliases to results, and how the custom call's
operands are made from the primitive's. ``declare`` turns it into a Primitive with
its impl, abstract eval, batching rule and a lowering for every platform, so no
import order can change which lowering a platform gets. Derivative rules live in
``autodiff.py``.

Every exchange takes an int32 scalar ``order`` token as its last operand and returns
the token it passes on as its last result: threading it from call to call is what
orders the calls on one Buffer identically on every rank.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax._src.dispatch import apply_primitive
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from . import lowering

# The params every exchange carries (dispatch-like ones add use_fp8 and round_scale).
# masked: the ranks the CPU reference masks (Buffer.trace_mask; no handler attribute).
EXCHANGE_PARAMS = ("num_experts", "max_tokens", "num_ranks", "axis_name", "buffer_id", "masked")


@dataclasses.dataclass(frozen=True)
class Exchange:
    """One exchange primitive, declared once.

    abstract(*avals, sa, **params): output avals; ``sa(shape, dtype)`` makes an aval that
      varies over the EP axis (and over whatever the inputs vary over).
    reference(*args, **params): outputs, in pure JAX (collectives over ``axis_name``).
    target: the CUDA custom call (an XLA FFI handler), None to lower the reference there too.
    aliases: {custom-call operand index: result index} (the order token, stats).
    hidden(avals_in): the hidden size the kernels get (they have limits on it).
    operands(*args, **params): the custom call's operands (default: the primitive's).
    phases: the handler's ``phases`` attribute (3 whole call, 2 receive half).
    """
    name: str
    abstract: Callable
    reference: Callable
    target: Optional[str]
    aliases: dict
    hidden: Callable
    operands: Optional[Callable] = None
    phases: int = lowering.PHASES_BOTH


def aval_maker(axis_name, *inputs):
    """ShapedArray constructor whose outputs vary over the EP axis inside shard_map.

    The outputs differ per rank, so with check_vma they must be typed as varying over
    the axis (plus whatever the inputs vary over). jax 0.10 keeps this in
    ``manual_axis_type.varying``; older releases in ``vma``.
    """
    sa = jax.core.ShapedArray
    extra = {axis_name} if axis_name is not None else set()
    if inputs and hasattr(inputs[0], "manual_axis_type"):
        mats = [a.manual_axis_type for a in inputs]
        varying = frozenset().union(*(m.varying for m in mats)) | extra
        mat = type(mats[0])(varying=varying, unreduced=frozenset(), reduced=frozenset())
        sharding = inputs[0].sharding
        return lambda shape, dtype: sa(
            shape, dtype, sharding=sharding.update(spec=jax.sharding.PartitionSpec()),
            manual_axis_type=mat)
    if inputs and hasattr(inputs[0], "vma"):
        vma = frozenset().union(*(a.vma for a in inputs)) | extra
        return lambda shape, dtype: sa(shape, dtype, vma=vma)
    return sa


def batched_loop(prim, args, dims, **params):
    """vmap = independent exchanges, one per batch element, run in sequence.

    Each element is a full collective call; the order token is chained from one
    element to the next so every rank runs them in the same order. Returns outputs
    stacked on axis 0 (the order token too).
    """
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    moved = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims)]
    order_pos = len(args) - 1
    results, order = [], None
    for b in range(size):
        elem = [a if d is None else a[b] for a, d in zip(moved, dims)]
        if order is not None:
            elem[order_pos] = order
        outs = prim.bind(*elem, **params)
        order = outs[-1]
        results.append(outs)
    stacked = [jnp.stack(col) for col in zip(*results)]
    return stacked, [0] * len(stacked)


def declare(ex: Exchange) -> Primitive:
    """The Primitive of ``ex`` with impl, abstract eval, batching and both lowerings."""
    p = Primitive(f"jax_mscclpp_ep_{ex.name}")
    p.multiple_results = True
    p.def_impl(functools.partial(apply_primitive, p))

    def abstract(*avals, **params):
        return ex.abstract(*avals, sa=aval_maker(params["axis_name"], *avals), **params)

    p.def_abstract_eval(abstract)
    batching.primitive_batchers[p] = functools.partial(batched_loop, p)
    reference = mlir.lower_fun(ex.reference, multiple_results=True)
    mlir.register_lowering(p, reference, platform="cpu")
    if ex.target is None:
        mlir.register_lowering(p, reference, platform="cuda")
    else:
        mlir.register_lowering(p, lowering.cuda_rule(ex.target, ex.aliases, ex.hidden,
                                                     ex.operands, ex.phases), platform="cuda")
    return p
