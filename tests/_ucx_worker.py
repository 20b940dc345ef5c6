"""One rank of a UCX connection check (libjmep_ucx.so through jax_mscclpp_ep.ucx),
run as one process per rank by tests/test_ucx_connection.py, on host memory over
TCP loopback (UCX_TLS=tcp unless set).

python tests/_ucx_worker.py --rank R --nranks N --case NAME --dir TMPDIR --seed S --signals rma|am

Ranks find each other through files in TMPDIR: each writes its address blob to
addr_<tag><rank>.bin (atomically, by rename) and polls for the others'. Every wait
is bounded; a rank that fails writes TMPDIR/ABORT so the others stop waiting at
once. Exit code 0 and a final line ``PASS <case>`` on success; otherwise a line
``FAIL <case> ...`` naming the rank, the seed and what differed, and exit code 1.

Over TCP, a peer's puts and atomics into our memory complete only while we call
progress(), so every rank that waits (for a flag word in its own memory, a file,
a barrier) keeps progressing while it waits.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import signal
import sys
import threading
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KiB, MiB = 1 << 10, 1 << 20
WAIT_S = 60.0  # bound of any single wait (a flag, a file, a barrier)

# Layout of every rank's region: control words in the first 4 KiB, data after.
GO, ACK, SEM, CNT = 0, 8, 16, 24  # 8-byte words
DONE = 64  # DONE + 8 * rank: a rank's "finished" flag (atomics case)
WORDS = 1024  # the atomically added words (atomics case)
DATA = 4096


def load_ucx(prefer_package: bool = False):
    """The ``jax_mscclpp_ep.ucx`` module without needing jax.

    ucx.py only uses ctypes and os, so the workers load it by path (the test passes the
    installed library's path in JMEP_UCX_LIBRARY): importing the
    package would import jax (its __init__ does), which costs every worker process
    half a second and needs jax installed. ``prefer_package`` (the pytest process,
    where jax is imported anyway) tries ``from jax_mscclpp_ep import ucx`` first.
    Either way falls back to the other.
    """
    def by_package():  # the installed package (the source tree has no compiled library)
        from jax_mscclpp_ep import ucx
        return ucx

    def by_path():
        name = "_jmep_ucx_standalone"
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(ROOT, "jax_mscclpp_ep", "ucx.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[name]
            raise
        return mod

    first, second = (by_package, by_path) if prefer_package else (by_path, by_package)
    try:
        return first()
    except ImportError:
        return second()


def fresh_bytes(n, *key):
    """n random bytes in 1..255 (never zero), a function of key."""
    return np.random.default_rng(list(key)).integers(1, 256, size=n, dtype=np.uint8)


def first_diff(got, want):
    bad = np.flatnonzero(got != want)
    if bad.size == 0:
        return "equal"
    i = int(bad[0])
    return (f"{bad.size} of {got.size} bytes differ, first at +{i}: got {int(got[i])} "
            f"want {int(want[i])} ({int(np.count_nonzero(got[bad] == 0))} of the differing "
            f"bytes are 0)")


class Ctx:
    def __init__(self, args):
        self.args = args
        self.rank, self.nranks, self.seed = args.rank, args.nranks, args.seed
        self.dir = args.dir
        self.signals = args.signals
        self.ucx = load_ucx()
        self._abort_path = os.path.join(self.dir, "ABORT")
        self._abort_checked = 0.0
        self.mem = None

    # ---- memory -------------------------------------------------------------------
    def alloc(self, nbytes):
        """A page-aligned zeroed uint8 array (kept alive on self)."""
        raw = np.zeros(nbytes + 4096, np.uint8)
        start = (-raw.ctypes.data) % 4096
        self._raw = raw
        self.mem = raw[start:start + nbytes]
        return self.mem

    def word(self, off, dtype=np.uint64):
        assert off % 8 == 0
        return self.mem[off:off + 8].view(dtype)

    def endpoint(self, timeout_s=10.0):
        return self.ucx.UcxEndpoint(self.rank, self.nranks, self.mem.ctypes.data,
                                    self.mem.nbytes, signal_mode=self.signals,
                                    timeout_s=timeout_s)

    # ---- files, waits ---------------------------------------------------------------
    def path(self, name):
        return os.path.join(self.dir, name)

    def write_file(self, name, data: bytes):
        tmp = self.path(f".{name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, self.path(name))

    def abort(self, msg):
        try:
            if not os.path.exists(self._abort_path):
                self.write_file("ABORT", msg.encode())
        except OSError:
            pass

    def check_abort(self, now):
        if now - self._abort_checked > 0.1:
            self._abort_checked = now
            if os.path.exists(self._abort_path):
                with open(self._abort_path, "rb") as f:
                    other = f.read().decode(errors="replace")
                raise RuntimeError(f"another rank failed: {other}")

    def wait(self, pred, what, ep=None, timeout=WAIT_S):
        """Until pred() holds, progressing ep (if given) meanwhile."""
        t0 = time.monotonic()
        spins = 0
        while not pred():
            if ep is not None:
                if ep.progress() == 0:
                    os.sched_yield()
            else:
                time.sleep(0.0005 if spins < 2000 else 0.005)
            spins += 1
            if spins & 63 == 0:
                now = time.monotonic()
                if now - t0 > timeout:
                    extra = "" if ep is None else (f"; outstanding={ep.outstanding()} "
                                                   f"last_error={ep.last_error()!r}")
                    raise TimeoutError(f"rank {self.rank}: no {what} after {timeout:.0f} s{extra}")
                self.check_abort(now)

    def wait_word(self, ep, off, value, what):
        w = self.word(off)
        value = int(value) & (2**64 - 1)
        try:
            self.wait(lambda: int(w[0]) == value, what, ep)
        except TimeoutError as e:
            raise TimeoutError(f"{e} (word at {off} is {int(w[0])}, waited for {value})") from None

    def wait_file(self, name, ep=None):
        p = self.path(name)
        self.wait(lambda: os.path.exists(p), f"file {name}", ep)
        with open(p, "rb") as f:
            return f.read()

    def connect_all(self, ep, tag=""):
        """Exchange address blobs through files, connect to every other rank."""
        self.write_file(f"addr_{tag}{self.rank}.bin", ep.address())
        for p in range(self.nranks):
            if p != self.rank:
                ep.connect(p, self.wait_file(f"addr_{tag}{p}.bin"))

    def barrier(self, tag, ep=None):
        self.write_file(f"bar_{tag}_{self.rank}", b"")
        for p in range(self.nranks):
            if p != self.rank:
                self.wait_file(f"bar_{tag}_{p}", ep)

    def finish(self, ep, tag="end"):
        """Complete everything, then close without a peer still needing us: a barrier
        while progressing (every rank's flush has returned, so nothing of anyone's
        is in flight), then one without (nobody progresses into a closed peer)."""
        ep.flush(-1)
        self.barrier(tag + "a", ep)
        self.barrier(tag + "b")
        ep.close()


# ---- cases ---------------------------------------------------------------------------

def case_puts(ctx):
    """Puts of 0 B .. 64 MiB at odd offsets, rank 0 -> rank 1; flush, then a store tells
    rank 1 to check the destination bytes exactly and every other data byte untouched."""
    nbytes = 81 * MiB
    mem = ctx.alloc(nbytes)
    area = nbytes - DATA
    rng = np.random.default_rng([ctx.seed, 11])
    rounds = []
    for n in [0, 4, KiB, MiB, 64 * MiB]:
        for _ in range(2):
            src = DATA + 1 + 2 * int(rng.integers(0, (area - n - 2) // 2))
            dst = DATA + 1 + 2 * int(rng.integers(0, (area - n - 2) // 2))
            rounds.append((n, src, dst))
    if ctx.rank == 1:
        bg = np.random.default_rng([ctx.seed, 12]).integers(0, 256, area, dtype=np.uint8)
        mem[DATA:] = bg
    ep = ctx.endpoint()
    ctx.connect_all(ep)
    for i, (n, src, dst) in enumerate(rounds, 1):
        what = f"round {i}: {n} B from offset {src} to offset {dst}"
        if ctx.rank == 0:
            mem[src:src + n] = fresh_bytes(n, ctx.seed, 13, i)
            ep.put(1, dst, src, n)
            ep.flush(1)
            assert ep.outstanding() == 0, f"{what}: outstanding()={ep.outstanding()} after flush"
            ep.store(1, GO, i)
            ctx.wait_word(ep, ACK, i, f"ack of {what}")
            if i == 1:
                print("transports to peer 1:", ep.describe(1).strip()[:2000], flush=True)
        else:
            ctx.wait_word(ep, GO, i, f"go signal of {what}")
            want = fresh_bytes(n, ctx.seed, 13, i)
            r = dst - DATA
            got = mem[dst:dst + n]
            assert np.array_equal(got, want), f"{what}: destination {first_diff(got, want)}"
            assert np.array_equal(mem[DATA:dst], bg[:r]), (
                f"{what}: bytes before the destination changed: "
                f"{first_diff(mem[DATA:dst], bg[:r])} (from offset {DATA})")
            assert np.array_equal(mem[dst + n:], bg[r + n:]), (
                f"{what}: bytes after the destination changed: "
                f"{first_diff(mem[dst + n:], bg[r + n:])} (from offset {dst + n})")
            mem[dst:dst + n] = bg[r:r + n]
            ep.store(0, ACK, i)
    ctx.finish(ep)


ADD_THREADS, ADDS_PER_THREAD, NWORDS = 4, 2500, 64


def add_plan(seed, rank, thread):
    """(word index, signed delta) of one adder thread: small, 32-bit and near-2^63
    magnitudes of both signs, plus the extremes."""
    rng = np.random.default_rng([seed, 21, rank, thread])
    n = ADDS_PER_THREAD
    idx = rng.integers(0, NWORDS, n)
    kind = rng.integers(0, 3, n)
    mag = np.where(kind == 0, rng.integers(1, 1000, n),
                   np.where(kind == 1, rng.integers(1, 2**32, n),
                            rng.integers(2**40, 2**63 - 1, n)))
    delta = mag * rng.choice(np.array([-1, 1]), n)
    delta[0], delta[1] = -(2**63), 2**63 - 1
    return idx, delta.astype(np.int64)


def case_atomics(ctx):
    """Ranks 1..N-1 each add signed deltas from ADD_THREADS threads at once to words of
    rank 0; rank 0 checks every word equals its initial value + the exact sum (mod 2^64,
    the adds' own arithmetic). A rank never adds to itself (not part of the API)."""
    assert ctx.nranks >= 2
    mem = ctx.alloc(1 * MiB)
    init = np.random.default_rng([ctx.seed, 20]).integers(
        -(2**63), 2**63 - 1, NWORDS, dtype=np.int64, endpoint=True)
    words = mem[WORDS:WORDS + 8 * NWORDS].view(np.uint64)
    if ctx.rank == 0:
        words[:] = init.view(np.uint64)  # before our address exists: no add can precede it
    ep = ctx.endpoint()
    ctx.connect_all(ep)
    if ctx.rank == 0:
        for r in range(1, ctx.nranks):
            ctx.wait_word(ep, DONE + 8 * r, 1, f"done flag of rank {r}")
        want = init.view(np.uint64).copy()
        for r in range(1, ctx.nranks):
            for t in range(ADD_THREADS):
                idx, delta = add_plan(ctx.seed, r, t)
                np.add.at(want, idx, delta.view(np.uint64))  # wraps mod 2^64
        bad = np.flatnonzero(words != want)
        assert bad.size == 0, (
            f"{bad.size} of {NWORDS} words wrong after {ADD_THREADS * ADDS_PER_THREAD} adds from "
            f"each of ranks 1..{ctx.nranks - 1}: "
            + ", ".join(f"word {i}: got {int(words[i].view(np.int64))} want "
                        f"{int(want[i].view(np.int64))} (diff "
                        f"{(int(words[i]) - int(want[i])) % 2**64})" for i in bad[:5]))
    else:
        plans = [add_plan(ctx.seed, ctx.rank, t) for t in range(ADD_THREADS)]
        errors = []
        start = threading.Barrier(ADD_THREADS)

        def adder(t):
            try:
                idx, delta = plans[t]
                idx, delta = idx.tolist(), delta.tolist()
                start.wait()
                for i, d in zip(idx, delta):
                    ep.add(0, WORDS + 8 * i, d)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(f"thread {t}: {type(e).__name__}: {e}")

        threads = [threading.Thread(target=adder, args=(t,)) for t in range(ADD_THREADS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, "; ".join(errors)
        ep.flush(0)  # every add has landed before the done flag is sent
        ep.store(0, DONE + 8 * ctx.rank, 1)
    ctx.finish(ep)


ORDER_ROUNDS, NSLOT, SLOT_STRIDE, POOL = 10_000, 16, 4096 + 64, 1 << 16


def case_order(ctx, signal_op):
    """10,000 rounds of put(fresh payload, 8..4096 B, into a ring of slots on rank 1)
    followed at once, without a flush, by a signal (store of the round number, or add
    of 1); rank 1 progresses until the signal shows the round, checks the slot holds
    exactly that round's payload (and nothing past it), clears it, and acks with the
    same kind of signal; rank 0 waits for the ack before the next round."""
    mem = ctx.alloc(1 * MiB)
    pool = fresh_bytes(POOL, ctx.seed, 31)
    rng = np.random.default_rng([ctx.seed, 32])
    sizes = rng.integers(8, 4097, ORDER_ROUNDS + 1).tolist()
    starts = rng.integers(0, POOL - 4096, ORDER_ROUNDS + 1).tolist()
    dst_of = [DATA + s * SLOT_STRIDE + s for s in range(NSLOT)]  # mostly unaligned
    src_of = [DATA + NSLOT * SLOT_STRIDE + s * SLOT_STRIDE + 3 * s + 1 for s in range(NSLOT)]
    assert src_of[-1] + 4096 <= mem.nbytes
    ep = ctx.endpoint()
    ctx.connect_all(ep)
    sig = ep.store if signal_op == "store" else (lambda peer, off, r: ep.add(peer, off, 1))
    for r in range(1, ORDER_ROUNDS + 1):
        s, n, a = r % NSLOT, sizes[r], starts[r]
        if ctx.rank == 0:
            mem[src_of[s]:src_of[s] + n] = pool[a:a + n]
            ep.put(1, dst_of[s], src_of[s], n)
            sig(1, SEM, r)
            ctx.wait_word(ep, ACK, r, f"ack of round {r}")
        else:
            ctx.wait_word(ep, SEM, r, f"signal of round {r}")
            d = dst_of[s]
            got = mem[d:d + n]
            if not np.array_equal(got, pool[a:a + n]):
                raise AssertionError(
                    f"round {r} ({signal_op} signal, {n} B into slot {s} at offset {d}): the "
                    f"signal arrived before the data: {first_diff(got, pool[a:a + n])}")
            tail = mem[d + n:d + 4096]
            assert not tail.any(), f"round {r}: bytes past the {n} B payload in slot {s} set"
            got[:] = 0
            sig(0, ACK, r)
        if r == 1 and ctx.rank == 0:
            print("transports to peer 1:", ep.describe(1).strip()[:2000], flush=True)
    ctx.finish(ep)


def case_flush(ctx):
    """Many puts (1 B..64 KiB at scattered odd offsets, no signal), then flush(1) (round
    1) or flush(-1) (round 2); rank 0 tells rank 1 by a file (no UCX), rank 1 checks
    every byte at once, without progressing again first."""
    nbytes = 24 * MiB
    mem = ctx.alloc(nbytes)
    area = nbytes - DATA
    if ctx.rank == 1:
        bg = np.random.default_rng([ctx.seed, 40]).integers(0, 256, area, dtype=np.uint8)
        mem[DATA:] = bg
    ep = ctx.endpoint()
    ctx.connect_all(ep)
    for k, peer in [(1, 1), (2, -1)]:
        rng = np.random.default_rng([ctx.seed, 41, k])
        count = 300
        sizes = (2 ** rng.uniform(0, 16, count)).astype(np.int64)
        gaps = rng.integers(1, 64, count)
        dst = DATA + 3 + np.concatenate([[0], np.cumsum(sizes + gaps)[:-1]])
        src = DATA + 1 + np.concatenate([[0], np.cumsum(sizes)[:-1]])
        assert dst[-1] + sizes[-1] <= nbytes
        payload = fresh_bytes(int(sizes.sum()), ctx.seed, 42, k)
        if ctx.rank == 0:
            mem[src[0]:src[0] + payload.size] = payload
            for n, s, d in zip(sizes.tolist(), src.tolist(), dst.tolist()):
                ep.put(1, d, s, n)
            ep.flush(peer)
            assert ep.outstanding() == 0, \
                f"round {k}: outstanding()={ep.outstanding()} after flush({peer})"
            ctx.write_file(f"flushed_{k}", b"")
            ctx.wait_file(f"verified_{k}", ep)
        else:
            ctx.wait_file(f"flushed_{k}", ep)  # progresses until the file appears, not after
            want = bg.copy()
            for n, s, d in zip(sizes.tolist(), src.tolist(), dst.tolist()):
                want[d - DATA:d - DATA + n] = payload[s - src[0]:s - src[0] + n]
            got = mem[DATA:]
            if not np.array_equal(got, want):
                bad = np.flatnonzero(got != want) + DATA
                which = int(np.searchsorted(dst, bad[0], side="right")) - 1
                raise AssertionError(
                    f"round {k}: after flush({peer}) returned on rank 0, {bad.size} bytes of "
                    f"{len(sizes)} puts ({int(sizes.sum())} B) are not there; first at offset "
                    f"{int(bad[0])} (put {which}: {int(sizes[which])} B at {int(dst[which])}): "
                    f"{first_diff(got, want)}")
            mem[DATA:] = bg
            ctx.write_file(f"verified_{k}", b"")
    ctx.finish(ep)


CYCLES = 50
FD_SLACK, THREAD_SLACK = 2, 1


def counts():
    return (len(os.listdir("/proc/self/fd")), threading.active_count(),
            len(os.listdir("/proc/self/task")))


def case_cycles(ctx):
    """CYCLES times: create an endpoint, exchange blobs, connect, one put + signal round
    each way, close. File descriptors and threads after the last cycle must be those
    after the first (the warm-up: UCX loads its transport modules and may start its
    process-wide async thread once). Slack: FD_SLACK fds, THREAD_SLACK OS threads for a
    socket or thread of the last close that UCX reaps asynchronously; a leak per cycle
    would show as 49."""
    mem = ctx.alloc(1 * MiB)
    seen = []
    for c in range(CYCLES):
        ep = ctx.endpoint()
        ctx.connect_all(ep, tag=f"c{c}_")
        n = 64 + c
        if ctx.rank == 0:
            mem[DATA + 1:DATA + 1 + n] = fresh_bytes(n, ctx.seed, 51, c)
            ep.put(1, DATA + 7, DATA + 1, n)
            ep.store(1, SEM, c + 1)
            ctx.wait_word(ep, ACK, c + 1, f"ack of cycle {c}")
        else:
            ctx.wait_word(ep, SEM, c + 1, f"signal of cycle {c}")
            got, want = mem[DATA + 7:DATA + 7 + n], fresh_bytes(n, ctx.seed, 51, c)
            assert np.array_equal(got, want), f"cycle {c}: {first_diff(got, want)}"
            ep.store(0, ACK, c + 1)
        ctx.finish(ep, tag=f"c{c}")
        del ep
        seen.append(counts())
    base, last = seen[0], seen[-1]
    series = f"(fds, python threads, OS threads) per cycle: {seen}"
    print(f"after warm-up {base}, after {CYCLES} cycles {last}", flush=True)
    assert last[0] - base[0] <= FD_SLACK, f"file descriptors leak: {base[0]} -> {last[0]}; {series}"
    assert last[1] == base[1], f"python threads leak: {base[1]} -> {last[1]}; {series}"
    assert last[2] - base[2] <= THREAD_SLACK, f"OS threads leak: {base[2]} -> {last[2]}; {series}"


KILL_TIMEOUT_S = 3.0


def rounds_until_error(ctx, ep, peer, what):
    """Put + store + flush towards `peer` (round 2, 3, ...) until a UcxError; returns
    (the error, the last round). Fails after 60 s without one."""
    i, t0 = 1, time.monotonic()
    try:
        while True:
            i += 1
            ep.put(peer, DATA + (i % 16) * 4096, DATA, 4096)
            ep.store(peer, SEM, i)
            ep.flush(peer)
            if time.monotonic() - t0 > 60:
                raise AssertionError(f"no error 60 s after {what} ({i} rounds)")
    except ctx.ucx.UcxError as e:
        return e, i


def die_after_round_1(ctx, ep, how="kill"):
    """The lost rank of the killed cases: acks rank 0's round 1, records when (and its
    pid) in the file killed_at, then SIGKILLs (how="kill") or SIGSTOPs itself."""
    ctx.wait_word(ep, SEM, 1, "signal of round 1")
    ep.store(0, ACK, 1)
    ep.flush(0)
    ctx.write_file("killed_at", f"{time.monotonic()!r} {os.getpid()}".encode())
    print(f"rank {ctx.rank}: {'killing' if how == 'kill' else 'stopping'} myself", flush=True)
    os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    time.sleep(10)
    raise AssertionError(f"still running after SIG{how.upper()}")


def round_1(ctx, ep, peer):
    """Rank 0's round 1 to the rank about to be lost: a fresh 4 KiB put and its signal, acked."""
    ctx.mem[DATA:DATA + 4096] = fresh_bytes(4096, ctx.seed, 61)
    ep.put(peer, DATA, DATA, 4096)
    ep.store(peer, SEM, 1)
    ctx.wait_word(ep, ACK, 1, f"rank {peer}'s ack of round 1")


def expect_ucx_errors(ctx, calls, why):
    """Every (name, call) raises UcxError; one that returns fails with "name() succeeded why"."""
    for name, call in calls:
        try:
            call()
        except ctx.ucx.UcxError:
            continue
        raise AssertionError(f"{name}() succeeded {why}")


def case_killed(ctx, how="kill"):
    """Rank 1 does one round, then SIGKILLs itself (how="kill": its sockets close, so
    rank 0 can see it at once) or SIGSTOPs itself (how="stop": a hung peer, seen only by
    the timeout), recording the time first. Rank 0 (timeout_s=3) keeps doing put +
    store + flush; it must get a UcxError within timeout + 1 s naming peer 1, the error
    must stay (sticky), and close() must not hang on the dead peer. A stopped rank 1
    is then SIGKILLed by rank 0."""
    ctx.alloc(1 * MiB)
    ep = ctx.endpoint(timeout_s=KILL_TIMEOUT_S if ctx.rank == 0 else 10.0)
    ctx.connect_all(ep)
    if ctx.rank == 1:
        die_after_round_1(ctx, ep, how)
    round_1(ctx, ep, 1)
    err, i = rounds_until_error(ctx, ep, 1, f"rank 1's SIG{how.upper()}")
    t_err = time.monotonic()
    t_kill, pid1 = ctx.wait_file("killed_at").decode().split()
    t_kill = float(t_kill)
    if how == "stop":
        os.kill(int(pid1), signal.SIGKILL)  # rank 1 of this case, stopped: end it
    msg, failed = str(err), ep.failed_peer()
    print(f"rank 0: error {t_err - t_kill:.3f} s after the {how}, after {i - 1} rounds: "
          f"failed_peer()={failed} message: {msg!r}", flush=True)
    assert t_err >= t_kill, f"error before the peer's {how} ({t_kill - t_err:.3f} s): {msg!r}"
    assert t_err - t_kill <= KILL_TIMEOUT_S + 1.0, (
        f"error only {t_err - t_kill:.2f} s after the {how} (timeout {KILL_TIMEOUT_S} s + 1 s): {msg!r}")
    assert failed == 1, f"failed_peer() is {failed}, not 1 (message {msg!r})"
    assert re.search(r"\b(peer|rank)\s*[#=:]?\s*1\b", msg, re.I), \
        f"the error message does not name peer 1: {msg!r}"
    assert ep.last_error() == msg, f"last_error() changed: {msg!r} -> {ep.last_error()!r}"
    expect_ucx_errors(ctx, [("put", lambda: ep.put(1, DATA, DATA, 8)), ("store", lambda: ep.store(1, SEM, 0)),
                            ("flush", lambda: ep.flush(-1)), ("progress", ep.progress)],
                      f"after the error (errors are sticky): {msg!r}")
    t = time.monotonic()
    ep.close()
    dt = time.monotonic() - t
    assert dt < 6.0, f"close() took {dt:.1f} s with a {'dead' if how == 'kill' else 'hung'} peer"


def case_killed_isolated(ctx):
    """Peer isolation (what a group that masks lost ranks uses): rank 2 does one round,
    then SIGKILLs itself. Rank 0 keeps writing to it until a UcxError naming peer 2
    (within timeout + 1 s); calls towards 2 keep failing, but progress() goes on and
    a put + signal + flush to rank 1 still arrive (rank 1 checks the bytes); close()
    stays bounded."""
    mem = ctx.alloc(1 * MiB)
    ep = ctx.endpoint(timeout_s=KILL_TIMEOUT_S if ctx.rank == 0 else 20.0)
    ep.set_peer_isolation(True)
    ctx.connect_all(ep)
    if ctx.rank == 2:
        die_after_round_1(ctx, ep)
    if ctx.rank == 1:
        ctx.wait_word(ep, SEM, 7, "rank 0's signal after rank 2 died")
        want = fresh_bytes(4096, ctx.seed, 62)
        assert np.array_equal(mem[DATA:DATA + 4096], want), "rank 0's put after the loss is wrong"
        ep.store(0, ACK, 7)
        ep.flush(0)
        ctx.write_file("done_1", b"")  # the survivors' barrier (rank 2 is gone)
        ctx.wait_file("done_0", ep)
        ep.close()
        return
    round_1(ctx, ep, 2)
    t_kill = float(ctx.wait_file("killed_at", ep).decode().split()[0])
    err, _ = rounds_until_error(ctx, ep, 2, "rank 2's SIGKILL")
    dt, msg = time.monotonic() - t_kill, str(err)
    print(f"rank 0: error {dt:.3f} s after the kill: failed_peer()={ep.failed_peer()} {msg!r}",
          flush=True)
    assert dt <= KILL_TIMEOUT_S + 1.0, f"error only {dt:.2f} s after the kill: {msg!r}"
    assert ep.failed_peer() == 2 and re.search(r"\bpeer\s*2\b", msg), msg
    expect_ucx_errors(ctx, [("put", lambda: ep.put(2, DATA, DATA, 8)), ("flush", lambda: ep.flush(2))],
                      "towards the lost peer")
    ep.progress()  # the worker is fine
    mem[DATA:DATA + 4096] = fresh_bytes(4096, ctx.seed, 62)
    ep.put(1, DATA, DATA, 4096)
    ep.store(1, SEM, 7)
    ep.flush(1)
    ctx.wait_word(ep, ACK, 7, "rank 1's ack after the loss")
    ctx.write_file("done_0", b"")
    ctx.wait_file("done_1", ep)
    t = time.monotonic()
    ep.close()
    assert time.monotonic() - t < 6.0, "close() took too long with a dead peer"


def case_rma_add_unsupported(ctx):
    """Signals by RMA on a transport without remote atomics (TCP): the first add fails
    with a clear error naming the peer and the remedy, within the timeout, no hang."""
    ctx.alloc(MiB)
    ep = ctx.endpoint(timeout_s=5.0)
    ctx.connect_all(ep)
    if ctx.rank == 0:
        t0 = time.monotonic()
        try:
            ep.add(1, 64, -7)
            ep.flush(1)
            raise AssertionError("an RMA add over this transport did not fail")
        except ctx.ucx.UcxError as e:
            msg = str(e)
        dt = time.monotonic() - t0
        assert "remote atomic add" in msg and "peer 1" in msg and "active message" in msg, msg
        assert dt < 6.0, f"took {dt:.1f} s to fail"
        print(f"  error as expected after {dt * 1e3:.0f} ms: {msg}", flush=True)
        ctx.write_file("seen", b"")
    else:
        try:
            ctx.wait_file("seen", ep)
        except ctx.ucx.UcxError:
            pass  # the peer's failed request may reset the connection
    ctx.barrier("end")
    ep.close()


CASES = {
    "rma_add_unsupported": (2, case_rma_add_unsupported),
    "puts": (2, case_puts),
    "atomics": (3, case_atomics),
    "order_store": (2, lambda ctx: case_order(ctx, "store")),
    "order_add": (2, lambda ctx: case_order(ctx, "add")),
    "flush": (2, case_flush),
    "cycles": (2, case_cycles),
    "killed": (2, case_killed),
    "stopped": (2, lambda ctx: case_killed(ctx, "stop")),
    "killed_isolated": (3, case_killed_isolated),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--nranks", type=int, required=True)
    ap.add_argument("--case", choices=sorted(CASES), required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--signals", choices=["rma", "am"], default="rma")
    args = ap.parse_args(argv)
    os.environ.setdefault("UCX_TLS", "tcp")
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    min_ranks, fn = CASES[args.case]
    tag = f"{args.case} (rank {args.rank}/{args.nranks}, signals={args.signals}, seed={args.seed})"
    ctx = None
    t0 = time.monotonic()
    try:
        assert args.nranks >= min_ranks, f"case {args.case} needs {min_ranks} ranks"
        ctx = Ctx(args)
        fn(ctx)
    except BaseException as e:  # noqa: BLE001 - report, tell the others, exit 1
        msg = f"FAIL {tag}: {type(e).__name__}: {e}"
        print(msg, flush=True)
        traceback.print_exc()
        sys.stderr.flush()
        if ctx is not None:
            ctx.abort(msg)
        else:
            try:
                with open(os.path.join(args.dir, "ABORT"), "w") as f:
                    f.write(msg)
            except OSError:
                pass
        os._exit(1)  # no destructors: a failed endpoint must not hang the report
    print(f"PASS {args.case} ({time.monotonic() - t0:.2f} s, {tag})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
