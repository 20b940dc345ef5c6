"""Expert ids outside [-1, E): counted in the graph, or checked with checkify.

``dispatch(check_ids=True)`` adds a ``checkify.check``. Staged without
``checkify.checkify``, JAX would fail at lowering with a generic message that
names neither this library nor the fix; a marker primitive in front of the
check fails first, with ours. ``checkify`` removes the marker (its checkify
rule is the identity), so under checkify only the check remains.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

# checkify's per-primitive rules (private): the marker needs an identity rule there.
# Their calling convention changed in jax 0.11 (one more positional argument, seen on
# the GPU image's 0.11.2), so the marker is used only where the rule was verified
# (jax 0.10); elsewhere the check stays and JAX's generic message does too.
_RULES_VERIFIED = jax.__version_info__[:2] == (0, 10)
try:
    from jax._src.checkify import error_checks as _checkify_rules
except ImportError:  # pragma: no cover - a JAX that moved it
    _checkify_rules = None
if not _RULES_VERIFIED:
    _checkify_rules = None


def invalid_ids(topk_idx, num_experts: int) -> jax.Array:
    """int32 scalar: how many entries of topk_idx lie outside [-1, num_experts).

    dispatch drops such slots (treated like -1, counted by ``Buffer.dropped_ids``);
    this is the same count computed in the graph, for this rank's rows.
    """
    idx = jnp.asarray(topk_idx)
    return jnp.sum(((idx < -1) | (idx >= num_experts)).astype(jnp.int32))


needs_checkify_p = Primitive("jax_mscclpp_ep_needs_checkify")
needs_checkify_p.def_impl(lambda n, *, what: n)  # eager: the check itself runs eagerly
needs_checkify_p.def_abstract_eval(lambda n, *, what: n)
batching.primitive_batchers[needs_checkify_p] = lambda args, dims, *, what: (
    needs_checkify_p.bind(args[0], what=what), dims[0])
ad.primitive_jvps[needs_checkify_p] = lambda primals, tangents, *, what: (
    needs_checkify_p.bind(primals[0], what=what), tangents[0])


def _not_functionalized(ctx, n, *, what):
    raise ValueError(
        f"jax_mscclpp_ep.{what}(check_ids=True) adds a checkify check, which needs the jitted "
        "step wrapped in checkify: f = jax.jit(checkify.checkify(step, "
        "errors=checkify.user_checks)); err, out = f(...); err.throw()")


mlir.register_lowering(needs_checkify_p, _not_functionalized)
if _checkify_rules is not None:
    _checkify_rules[needs_checkify_p] = lambda error, enabled, n, *, what: (error, n)


def check_ids(topk_idx, num_experts: int, axis_name, what: str) -> None:
    """A checkify check that every expert id lies in [-1, E), over the whole EP axis
    (the message gives the group's count, the same on every rank)."""
    # Imported here: checkify is only needed by callers who ask for the check.
    from jax.experimental import checkify
    n = invalid_ids(topk_idx, num_experts)
    if axis_name is not None:
        n = lax.psum(n, axis_name)
    if _checkify_rules is not None:
        n = needs_checkify_p.bind(n, what=what)
    where = "" if axis_name is None else f" across the EP axis {axis_name!r}"
    tail = f" outside [-1, {num_experts}){where}; dispatch would drop them"
    # Two checks so the grammar fits the count; at most one of them fails.
    checkify.check(n != 1, f"jax_mscclpp_ep.{what}: topk_idx holds 1 expert id{tail}")
    checkify.check(n <= 1, f"jax_mscclpp_ep.{what}: topk_idx holds {{n}} expert ids{tail}", n=n)
