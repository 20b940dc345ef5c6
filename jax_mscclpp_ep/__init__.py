"""jax_mscclpp_ep: DeepEP-style low-latency MoE dispatch/combine for JAX.

dispatch / combine are JAX primitives that run inside jit and shard_map: on
GPUs they lower to CUDA kernels (XLA FFI custom calls) over an MSCCL++-style
channel layer, on CPUs to a pure-JAX reference with the same contract.
"""

from . import config, reference
from .native import cuda_enabled, native_version
from .api import DispatchHandle, DispatchResult, combine, dispatch, invalid_ids
from .buffer import Buffer, BufferClosedError
from .alive import alive_experts, alive_ranks
from .mask import MaskEvent
from .config import EPConfig, size_hint
from .exchanges import combine_p, dispatch_p
from .reference import dequantize, fp8_cast, unpack_layout
from .split import (PendingCombine, PendingDispatch, combine_recv, combine_send, dispatch_recv,
                    dispatch_send)
from . import deepep, moe  # deepep: Buffer's DeepEP-named methods

__version__ = "0.1.0"

__all__ = [
    "Buffer", "BufferClosedError", "DispatchHandle", "DispatchResult", "EPConfig", "combine",
    "combine_p", "config", "cuda_enabled", "dequantize", "dispatch", "dispatch_p", "fp8_cast",
    "invalid_ids", "native_version", "reference", "size_hint", "unpack_layout", "dispatch_send", "dispatch_recv",
    "combine_send", "combine_recv", "PendingDispatch", "PendingCombine", "moe",
    "deepep", "alive_experts", "alive_ranks", "MaskEvent",
]
