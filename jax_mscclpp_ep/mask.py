"""Masked ranks: the ranks an EP group has stopped exchanging with (issue 17).

A rank is masked by the user (``Buffer.mask_ranks``) or, with
``on_peer_failure="mask"``, by the kernels when a wait on it times out. On GPUs the
mask lives on the device (the kernels read it on every call, so nothing retraces);
a Buffer without device state (CPU) keeps it here, on the host, and the reference
reads it at trace time, so changing it clears JAX's caches.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax

POLICIES = ("raise", "mask")
USER = -1  # MaskEvent.detected_by of a rank the user masked


class MaskEvent(NamedTuple):
    peer: int         # the masked rank
    detected_by: int  # the rank whose wait on it timed out, USER (-1) when set by the user
    phase: str        # where it was detected, e.g. "dispatch receive"; "user" when set by the user


def check_policy(on_peer_failure) -> str:
    if on_peer_failure not in POLICIES:
        raise ValueError(f"on_peer_failure must be one of {POLICIES}, got {on_peer_failure!r}")
    return on_peer_failure


def check_ranks(ranks, num_ranks: int) -> tuple:
    """Sorted distinct ranks, each an int in [0, num_ranks)."""
    if isinstance(ranks, numbers.Integral):
        raise TypeError(f"mask_ranks takes a list of ranks, got the single int {ranks}: "
                        f"pass [{ranks}]")
    ranks = list(ranks)
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, numbers.Integral):
            raise ValueError(f"ranks to mask must be ints, got {r!r} ({type(r).__name__})")
        if not 0 <= r < num_ranks:
            raise ValueError(f"rank {r} is outside the EP group's ranks [0, {num_ranks})")
    return tuple(sorted({int(r) for r in ranks}))


def alive_table(num_experts: int, num_ranks: int, masked) -> list:
    """[E] bools: expert e's owner rank e // (E / R) is not masked."""
    le = num_experts // num_ranks
    dead = set(masked)
    return [e // le not in dead for e in range(num_experts)]


def merge_events(per_device) -> list:
    """One MaskEvent per peer from each device's (peer, detected_by, phase) lists, the first
    device's first; sorted by peer."""
    seen = {}
    for events in per_device:
        for peer, by, phase in events:
            seen.setdefault(int(peer), MaskEvent(int(peer), int(by), str(phase)))
    return [seen[p] for p in sorted(seen)]


class HostMask:
    """The mask of a Buffer without device state (CPU). Every change clears JAX's caches,
    so functions jitted before retrace and the reference sees the new mask."""

    def __init__(self):
        self.ranks: tuple = ()

    def add(self, ranks: tuple) -> None:
        new = tuple(sorted(set(self.ranks) | set(ranks)))
        if new != self.ranks:
            self.ranks = new
            jax.clear_caches()

    def clear(self) -> None:
        if self.ranks:
            self.ranks = ()
            jax.clear_caches()

    def events(self) -> list:
        return [MaskEvent(r, USER, "user") for r in self.ranks]
