"""Masked ranks across processes (issue 17): the group masks a rank the user names and
unmasks it again; with on_peer_failure="mask", a rank that dies mid-loop is masked by the
survivors, who keep serving 1,000 steps of fresh routing equal to the reference with
that rank masked."""

from __future__ import annotations

import os
import signal
import sys
import time

import jax
import numpy as np
import pytest

import case_report
from jax_mscclpp_ep import kv
from ll_check import (check_combine, check_outputs, check_step, expected, expert_scales, inputs,
                      step_fn)

E, M, H, K = 32, 32, 512, 4  # small: three processes time-slice one GPU for 1,000 steps


def test_mask_user(group, rng):
    """Every rank masks one rank, steps, unmasks, steps (twice, so that both halves of the
    buffer see each state): each step equals the reference with that mask."""
    r = group.num_ranks
    if r < 2:
        pytest.skip("needs a peer to mask")
    dead = min(2, r - 1)
    buf = group.new_buffer(E, M, H)
    f = None
    for rnd in range(2):
        for masked in ((dead,), ()):
            if masked:
                buf.mask_ranks(list(masked))
            else:
                buf.unmask_all()
            group.barrier(f"mask_user_{rnd}_{len(masked)}")  # every rank changed it before a step
            assert buf.masked_ranks() == list(masked), buf.masked_ranks()
            for _ in range(3):
                f = check_step(group, rng, buf, *inputs(rng, r, M, H, K, E), use_fp8=True, fn=f,
                               masked=masked)
    assert buf.mask_events() == []
    group.barrier("mask_user_done")
    buf.close()
    group.log("PASS mask_user")


def draw(rng, group, buf):
    r = group.num_ranks
    x, idx, w = inputs(rng, r, M, H, K, E)
    return x, idx, w, expert_scales(rng, group, buf)


def test_mask_lost_rank(group, rng):
    """The last rank SIGKILLs itself right after enqueuing a step. Each survivor: the steps
    until it sees the rank masked take at most timeout + 1 s and give the combine of the
    full or the masked reference; then group.settings.steps steps of fresh routing equal
    the reference with the rank masked, none near the timeout; masked_ranks() == [dead]."""
    if not group.on_gpu or not group.settings.coordinator:
        pytest.skip("needs the kernels' device timeouts and one process per rank")
    r, tmo = group.num_ranks, 2.0
    dead, me = r - 1, group.settings.process_id
    assert dead != 0, "rank 0 hosts jax.distributed's coordination service: it must live"
    buf = group.new_buffer(E, M, H, timeout_s=tmo, on_peer_failure="mask")
    # Compile the step and both references first, then start together: a rank compiling
    # while its peers wait in a kernel longer than the timeout would be masked, by design.
    x, idx, w, c = draw(rng, group, buf)
    for masked in ((), (dead,)):
        expected(group, buf, x, idx, w, c, True, False, masked)
    f = step_fn(group, buf, True, False).lower(*(group.put(a) for a in (x, idx, w, c))).compile()
    group.barrier("mask_lost_rank_compiled")
    for _ in range(5):
        x, idx, w, c = draw(rng, group, buf)
        got = [group.local(o) for o in f(*(group.put(a) for a in (x, idx, w, c)))]
        check_outputs(buf, got, *expected(group, buf, x, idx, w, c, True, False), True)
    buf.check()
    assert buf.masked_ranks() == []
    group.barrier("mask_lost_rank_go")
    if me == dead:
        x, idx, w, c = draw(rng, group, buf)
        f(*(group.put(a) for a in (x, idx, w, c)))  # a kernel may be in flight
        group.log("SIGKILL to myself (the lost rank)")
        case_report.record_exit("killed itself on purpose: the lost rank")
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    t_kill, window, checked, slowest, settled = time.perf_counter(), 0, 0, 0.0, False
    while checked < group.settings.steps:
        x, idx, w, c = draw(rng, group, buf)
        t0 = time.perf_counter()
        got = [group.local(o) for o in f(*(group.put(a) for a in (x, idx, w, c)))]
        dt = time.perf_counter() - t0
        if not settled:
            # The kill step (the lost rank's kernel may have finished it) or the next, which
            # waits on it: each ends within the timeout with the combine of the full
            # reference or of the masked one.
            window += 1
            assert window <= 2, f"rank {dead} still not masked after {window - 1} steps"
            assert dt < tmo + 1, f"a step after rank {dead} died took {dt:.1f} s"
            full = expected(group, buf, x, idx, w, c, True, False)[1]
            cut = expected(group, buf, x, idx, w, c, True, False, (dead,))[1]
            for q, out in got[-1].items():
                try:
                    check_combine(out, cut[q], f"rank {q}, masked reference")
                except AssertionError:
                    check_combine(out, full[q], f"rank {q}: neither masked nor full reference")
            masked = buf.masked_ranks()
            settled = masked == [dead]
            # Each survivor's steps around the kill, for the log: when a survivor
            # learnt of the loss (and from whom) is what a failure here turns on.
            group.log(f"window step {window}: {dt:.3f} s, masked {masked}, "
                      f"events {buf.mask_events()}")
            continue
        assert dt < tmo, f"step {checked} after the mask took {dt:.1f} s: a wait on the lost rank?"
        slowest = max(slowest, dt)
        check_outputs(buf, got, *expected(group, buf, x, idx, w, c, True, False, (dead,)), True)
        checked += 1
        if checked % 100 == 0:
            assert buf.masked_ranks() == [dead], f"step {checked}: {buf.masked_ranks()}"
    buf.check()  # mask mode: a masked peer is no error
    assert buf.masked_ranks() == [dead]
    events = buf.mask_events()
    assert [e.peer for e in events] == [dead] and events[0].detected_by != dead, events
    summary = (f"masked {events} after {window} step(s); {checked} steps checked in "
               f"{time.perf_counter() - t_kill:.1f} s since the kill (slowest {slowest * 1e3:.0f} ms)")
    group.log("PASS mask_lost_rank:", summary)
    case_report.record_exit(summary)
    # Rank 0 hosts the coordination service: it leaves after the other survivors.
    c = kv.client()
    kv.put(c, f"mask_lost_rank_done/{me}", b"1")
    if me == 0:
        for p in range(1, dead):
            kv.get(c, f"mask_lost_rank_done/{p}", 120_000)
    sys.stdout.flush()
    os._exit(0)  # the group's teardown would wait for the lost rank
