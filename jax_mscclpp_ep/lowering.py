"""The CUDA lowering of the exchanges: one XLA FFI custom call each.

The handlers (ffi/handlers/) take one attribute set, the same for all of them, in
the order ``native.ext.ll_attributes()`` gives; a primitive param of the same name
supplies each value (a missing one is 0 / False). So a new attribute is one member
of the C++ struct plus the primitive param of that name.
"""

from __future__ import annotations

import jax
import numpy as np
from jax import lax
from jax.interpreters import mlir

from . import config as cfg
from . import native

PHASES_BOTH, PHASES_RECV = 3, 2  # kLlPhaseBoth / kLlPhaseRecv in ll_args.cuh

# The targets this build registers with XLA (none without the CUDA build): each an
# instantiate + execute bundle, the instantiate stage tying the Buffer's device state
# to the executable (ffi/handlers/ll_ref.cc).
TARGETS = dict(native.ext.ffi_targets()) if native.cuda_enabled() else {}
for _name, _bundle in TARGETS.items():
    jax.ffi.register_ffi_target(_name, _bundle, platform="CUDA")
# [(name, "i64" | "bool")]: what every handler decodes (ffi/handlers/ll_attrs.h).
ATTRIBUTES = tuple(native.ext.ll_attributes()) if native.cuda_enabled() else ()


def check_target(target: str, buffer_id) -> None:
    if buffer_id is None or int(buffer_id) < 0:
        raise ValueError("a jax_mscclpp_ep.Buffer is required on GPU: pass buffer=Buffer(config, "
                         "mesh=...) to dispatch/combine (an EPConfig only runs the CPU reference)")
    if target not in TARGETS:
        raise RuntimeError(f"this install of jax_mscclpp_ep has no {target} kernel: "
                           f"{native.no_cuda_message()}")


def check_hidden(h: int) -> None:
    if h % cfg.GPU_HIDDEN_MULTIPLE or h > cfg.GPU_MAX_HIDDEN:
        raise ValueError(f"the CUDA kernels need hidden to be a multiple of {cfg.GPU_HIDDEN_MULTIPLE} "
                         f"and <= {cfg.GPU_MAX_HIDDEN}, got {h}")


def attributes(params: dict, phases: int) -> dict:
    """The handlers' attributes from a primitive's params."""
    values = dict(params, phases=phases)
    out = {}
    for name, kind in ATTRIBUTES:
        v = values.get(name, 0)
        out[name] = bool(v) if kind == "bool" else np.int64(v)
    return out


def isolated_call(target: str, avals_out, operands, aliases: dict, attrs: dict):
    """One FFI custom call whose results pass through an optimization barrier.

    The barrier keeps XLA:GPU's dynamic-slice fusion (on by default in jax 0.11) from
    folding the dynamic-update-slice that stacks a lax.scan iteration's results (the
    residuals of the backward pass) into our custom call: with that fusion the handle
    the kernels wrote for one layer was not the one the backward pass read (the router
    gradient of layers scanned on one Buffer was wrong, 1x H200, jax 0.11.2; right with
    --xla_gpu_enable_dynamic_slice_fusion=false, with this barrier, and not with a
    barrier on the operands alone: scripts/gpu_scan_probe.sh). The stacking becomes an
    ordinary copy. Traced inside a lowering (``mlir.lower_fun``)."""
    out_types = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals_out)
    outs = jax.ffi.ffi_call(target, out_types, input_output_aliases=aliases)(*operands, **attrs)
    return list(lax.optimization_barrier(tuple(outs)))


def cuda_rule(target: str, aliases: dict, hidden, operands, phases: int):
    """The lowering rule of one exchange to its custom call (see declare.Exchange)."""
    def rule(ctx, *args, **params):
        check_target(target, params["buffer_id"])
        check_hidden(hidden(ctx.avals_in))
        attrs = attributes(params, phases)

        def call(*xs):
            ops = xs if operands is None else operands(*xs, **params)
            return isolated_call(target, ctx.avals_out, ops, aliases, attrs)
        return mlir.lower_fun(call, multiple_results=True)(ctx, *args)
    return rule
