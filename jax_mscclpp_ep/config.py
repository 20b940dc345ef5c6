"""Shapes, limits, validation and the persistent-buffer size formula.

Everything here is pure Python so it can run at trace time, before any device
code: a bad call fails with a message naming the argument and the rule.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

# Limits shared by the reference and the CUDA kernels. The kernels' own copy is
# ffi/kernels/ll_limits.h (_ep.ll_limits(); tests/test_native.py checks they agree).
MAX_TOPK = 16
MAX_EXPERTS = 1024
MAX_TOKENS_PER_RANK = 1024
MAX_RANKS = 64  # ranks of one EP group the kernels support
FP8_BLOCK = 128  # channels per fp8 scale
# The CUDA kernels need H % 128 == 0 and H <= 8192 (checked in the GPU lowering).
GPU_MAX_HIDDEN = 8192
GPU_HIDDEN_MULTIPLE = 128
# Device-side waits give up after this long (JMEP_TIMEOUT_S / Buffer(timeout_s=)).
# Generous, like DeepEP's: in a multi-process job one rank may enter its first call
# while a peer is still compiling, and that must not count as a dead peer.
DEFAULT_TIMEOUT_S = 100.0

_ALIGN = 128


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def dispatch_msg_bytes(hidden: int) -> int:
    """One dispatch message: 16-byte header + the larger of the bf16 and fp8 payloads."""
    return 16 + max(2 * hidden, hidden + (hidden // FP8_BLOCK) * 4)


def combine_msg_bytes(hidden: int) -> int:
    return 2 * hidden


def size_hint(max_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int) -> int:
    """Bytes of the persistent communication buffer each rank needs.

    Two halves (even/odd calls alternate), each with a send area, a receive
    area and a signalling area (int64 dispatch counters + int64 combine
    flags, one per expert), then one int64 per rank for rank-mask reports. Every
    rank must use the same value.
    """
    m, h, e = int(max_tokens_per_rank), int(hidden), int(num_experts)
    _check_positive("max_tokens_per_rank", m)
    _check_positive("hidden", h)
    _check_positive("num_ranks", int(num_ranks))
    _check_positive("num_experts", e)
    if e % num_ranks:
        raise ValueError(f"num_experts={e} must be divisible by num_ranks={num_ranks}")
    dmsg, cmsg = dispatch_msg_bytes(h), combine_msg_bytes(h)
    send = max(m * dmsg, e * m * cmsg)
    recv = max(e * m * dmsg, e * m * cmsg)
    signal = 2 * e * 8
    mask_reports = (int(num_ranks) + 1) * 8  # one word per source rank + a stage (rank masks)
    return 2 * (_align(send) + _align(recv) + _align(signal)) + _align(mask_reports)


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class EPConfig:
    """Static shape of one expert-parallel exchange.

    num_experts: E, all experts across the EP group (divisible by its size R).
    max_tokens_per_rank: M, the most tokens any rank sends in one call (T <= M).
    hidden: H, channels per token.
    """

    num_experts: int
    max_tokens_per_rank: int
    hidden: int

    def __post_init__(self):
        _check_positive("num_experts", self.num_experts)
        _check_positive("max_tokens_per_rank", self.max_tokens_per_rank)
        _check_positive("hidden", self.hidden)
        if self.num_experts > MAX_EXPERTS:
            raise ValueError(f"num_experts={self.num_experts} exceeds the limit {MAX_EXPERTS}")
        if self.max_tokens_per_rank > MAX_TOKENS_PER_RANK:
            raise ValueError(
                f"max_tokens_per_rank={self.max_tokens_per_rank} exceeds the limit {MAX_TOKENS_PER_RANK}")

    def size_hint(self, num_ranks: int) -> int:
        return size_hint(self.max_tokens_per_rank, self.hidden, num_ranks, self.num_experts)

    def local_experts(self, num_ranks: int) -> int:
        check_num_ranks(self, num_ranks)
        return self.num_experts // num_ranks


def check_num_ranks(config: EPConfig, num_ranks: int) -> None:
    if config.num_experts % num_ranks:
        raise ValueError(
            f"num_experts={config.num_experts} is not divisible by the EP axis size {num_ranks}; "
            "every rank must hold the same number of experts")


def _shape(a) -> tuple:
    return tuple(np.shape(a))


def _dtype(a):
    return jnp.result_type(a) if not hasattr(a, "dtype") else a.dtype


def check_dispatch_args(config: EPConfig, num_ranks: int, x, topk_idx, stats, use_fp8: bool) -> None:
    """Trace-time checks for dispatch; raises TypeError/ValueError naming the argument."""
    check_num_ranks(config, num_ranks)
    if len(_shape(x)) != 2:
        raise ValueError(f"x must have shape [T, H], got rank {len(_shape(x))} shape {_shape(x)}")
    if _dtype(x) != jnp.bfloat16:
        raise TypeError(f"x must be bfloat16, got {_dtype(x)}")
    t, h = _shape(x)
    if h != config.hidden:
        raise ValueError(f"x has hidden size {h} but the buffer/config was made for hidden={config.hidden}")
    if t > config.max_tokens_per_rank:
        raise ValueError(
            f"x has T={t} tokens per rank, more than max_tokens_per_rank M={config.max_tokens_per_rank}")
    check_topk_idx(topk_idx, t)
    if use_fp8 and h % FP8_BLOCK:
        raise ValueError(f"use_fp8 needs hidden to be a multiple of {FP8_BLOCK}, got hidden={h}")
    if stats is not None:
        le = config.num_experts // num_ranks
        if _shape(stats) != (le,) or _dtype(stats) != jnp.int32:
            raise ValueError(
                f"stats must be int32 of shape [num_local_experts]=({le},), got "
                f"{_dtype(stats)}{list(_shape(stats))}")


def check_topk_idx(topk_idx, t: int) -> None:
    if len(_shape(topk_idx)) != 2:
        raise ValueError(f"topk_idx must have shape [T, K], got shape {_shape(topk_idx)}")
    if _dtype(topk_idx) not in (jnp.int32, jnp.int64):
        raise TypeError(f"topk_idx must be int32 or int64, got {_dtype(topk_idx)}")
    ti, k = _shape(topk_idx)
    if ti != t:
        raise ValueError(f"topk_idx has {ti} rows but x/out has T={t} tokens")
    if k < 1 or k > MAX_TOPK:
        raise ValueError(f"topk_idx has K={k} slots; K must be in [1, {MAX_TOPK}]")


def check_combine_args(config: EPConfig, num_ranks: int, y, topk_idx, topk_weights, src_info,
                       layout_range) -> None:
    check_num_ranks(config, num_ranks)
    le = config.num_experts // num_ranks
    rows = num_ranks * config.max_tokens_per_rank
    want = (le, rows, config.hidden)
    if _shape(y) != want:
        raise ValueError(f"y must have shape [LE, R*M, H]={list(want)}, got {list(_shape(y))}")
    if _dtype(y) != jnp.bfloat16:
        raise TypeError(f"y must be bfloat16, got {_dtype(y)}")
    if len(_shape(topk_idx)) != 2:
        raise ValueError(f"topk_idx must have shape [T, K], got shape {_shape(topk_idx)}")
    t = _shape(topk_idx)[0]
    if t > config.max_tokens_per_rank:
        raise ValueError(
            f"topk_idx has T={t} tokens, more than max_tokens_per_rank M={config.max_tokens_per_rank}")
    check_topk_idx(topk_idx, t)
    if _shape(topk_weights) != _shape(topk_idx):
        raise ValueError(
            f"topk_weights shape {list(_shape(topk_weights))} must equal topk_idx shape "
            f"{list(_shape(topk_idx))}")
    if _dtype(topk_weights) != jnp.float32:
        raise TypeError(f"topk_weights must be float32, got {_dtype(topk_weights)}")
    if _shape(src_info) != (le, rows) or _dtype(src_info) != jnp.int32:
        raise ValueError(
            f"handle.src_info must be int32[{le}, {rows}], got {_dtype(src_info)}{list(_shape(src_info))}")
    want_lr = layout_range_aval(le, num_ranks)
    if _shape(layout_range) != want_lr.shape or _dtype(layout_range) != want_lr.dtype:
        raise ValueError(
            f"handle.layout_range must be {want_lr.dtype}{list(want_lr.shape)}, got "
            f"{_dtype(layout_range)}{list(_shape(layout_range))}; was it made with the same "
            "jax_enable_x64 setting and EP axis?")


def x64_enabled() -> bool:
    return bool(jax.config.jax_enable_x64)


def layout_range_aval(num_local_experts: int, num_ranks: int) -> jax.ShapeDtypeStruct:
    """int64[LE, R] with x64 on; otherwise int32[LE, R, 2] holding the same bytes."""
    if x64_enabled():
        return jax.ShapeDtypeStruct((num_local_experts, num_ranks), jnp.int64)
    return jax.ShapeDtypeStruct((num_local_experts, num_ranks, 2), jnp.int32)
