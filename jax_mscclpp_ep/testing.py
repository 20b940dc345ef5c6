"""Helpers for comparing dispatch results whose row order may differ.

The contract leaves the order of source-rank blocks inside an expert's rows,
and of rows inside a block, to the implementation. ``normalize_dispatch``
checks the layout invariants and returns a canonical form in which each
(expert, source rank) block is sorted by source token, so two correct
results compare equal element for element.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Canonical(NamedTuple):
    x: np.ndarray        # [LE, R, M, H] rows by (expert, source rank, ascending token); zeros past count
    scales: np.ndarray   # [LE, R, M, S] likewise (S = 0 without fp8)
    tokens: np.ndarray   # [LE, R, M] source token per row, -1 past count
    count: np.ndarray    # [LE, R] rows per (expert, source rank)
    recv_count: np.ndarray  # [LE]


def layout_numpy(layout_range) -> tuple[np.ndarray, np.ndarray]:
    """(offset, count) from int64[LE, R] or int32[LE, R, 2] layout_range."""
    lr = np.asarray(layout_range)
    if lr.dtype == np.int64:
        return (lr >> 32).astype(np.int64), (lr & 0xFFFFFFFF).astype(np.int64)
    return lr[..., 1].astype(np.int64), lr[..., 0].astype(np.int64)


def normalize_dispatch(recv_x, recv_scales, recv_count, src_info, layout_range, max_tokens) -> Canonical:
    """Canonical form of one rank's dispatch output; asserts the layout invariants."""
    x = np.asarray(recv_x)
    le, rows, h = x.shape
    sc = np.zeros((le, rows, 0), np.float32) if recv_scales is None else np.asarray(recv_scales)
    cnt_total = np.asarray(recv_count)
    src = np.asarray(src_info)
    offset, count = layout_numpy(layout_range)
    r = offset.shape[1]
    m = max_tokens
    out_x = np.zeros((le, r, m, h), x.dtype)
    out_s = np.zeros((le, r, m, sc.shape[-1]), sc.dtype)
    out_t = np.full((le, r, m), -1, np.int64)
    for j in range(le):
        # Blocks tile [0, recv_count) exactly, without overlap.
        spans = sorted((int(offset[j, s]), int(count[j, s])) for s in range(r) if count[j, s] > 0)
        pos = 0
        for off, c in spans:
            assert off == pos, f"expert {j}: blocks do not tile its rows (gap/overlap at {pos})"
            pos += c
        assert pos == cnt_total[j], f"expert {j}: blocks cover {pos} rows, recv_count={cnt_total[j]}"
        for s in range(r):
            off, c = int(offset[j, s]), int(count[j, s])
            assert 0 <= c <= m, f"expert {j} source {s}: count {c} outside [0, {m}]"
            toks = src[j, off:off + c]
            assert len(set(toks.tolist())) == c, f"expert {j} source {s}: repeated src_info"
            assert c == 0 or (toks.min() >= 0 and toks.max() < m), "src_info outside [0, M)"
            order = np.argsort(toks, kind="stable")
            out_x[j, s, :c] = x[j, off:off + c][order]
            out_s[j, s, :c] = sc[j, off:off + c][order]
            out_t[j, s, :c] = toks[order]
    return Canonical(out_x, out_s, out_t, count, cnt_total)


def assert_dispatch_equal(got: Canonical, want: Canonical) -> None:
    np.testing.assert_array_equal(got.recv_count, want.recv_count, "recv_count")
    np.testing.assert_array_equal(got.count, want.count, "per-(expert, source) counts")
    np.testing.assert_array_equal(got.tokens, want.tokens, "src_info")
    np.testing.assert_array_equal(got.x.view(np.uint8), want.x.view(np.uint8), "recv_x bits")
    np.testing.assert_array_equal(got.scales, want.scales, "recv_scales")
