"""Channel-layer GPU checks, run as one process per GPU (``--mode multi``) or
one process driving both GPUs (``--mode single``). Every check is symmetric:
each rank does the same thing towards its peer. Prints ``PASS``/``FAIL``
lines and a final ``SUMMARY passed=N failed=M``; exit code 1 on failure.

python tests/_channels_worker.py --mode single --seed 123
python tests/_channels_worker.py --mode multi --rank R --nproc 2 --port P --seed 123
  [--host-id H]   (JMEP_HOST_ID: ranks with different ids act as two hosts, over UCX)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import numpy as np


class _TestKernels:
    """jax_mscclpp_ep._ep_testing (the channel test kernels, a test-only module), imported
    on first use like the package itself here: after the worker has set up its environment."""

    def __getattr__(self, name):
        from jax_mscclpp_ep import _ep_testing
        return getattr(_ep_testing, name)


kt = _TestKernels()

MiB = 1 << 20
BUF = 160 * MiB
SRC_BASE, DST_BASE = 0, 80 * MiB  # put source / destination regions


class Ctx:
    def __init__(self, args):
        self.args = args
        self.multi = args.mode == "multi"
        self.results = []
        self.shared_gpu = self.multi and len(set(args.device_list)) < args.nproc

    def create(self, buffer_bytes=BUF, **kw):
        from jax_mscclpp_ep import channels
        devices = None if self.multi else self.args.device_list
        return channels.create_communicators(buffer_bytes, devices=devices, **kw)

    def close(self, comms):
        from jax_mscclpp_ep import channels
        channels.close_communicators(comms)

    def check(self, name, fn, *a):
        t0 = time.perf_counter()
        try:
            fn(*a)
            self.results.append((name, True))
            print(f"PASS {name} ({time.perf_counter() - t0:.2f}s)", flush=True)
        except Exception as e:  # report and go on with the next check
            self.results.append((name, False))
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()


def peer(c):
    return 1 - c.rank


def sync_all(comms):
    for c in comms:
        c.sync()


def barrier(comms, iters=1):
    for c in comms:
        kt.scratch(c)
        kt.test_barrier(c, iters)
    sync_all(comms)
    for c in comms:
        err, ns = kt.scratch(c)
        assert err == 0, f"barrier failures on rank {c.rank}: {err}"


def data(seed, rank, case, n):
    rng = np.random.default_rng([seed, rank, case])
    return rng.integers(1, 256, size=n, dtype=np.uint8).tobytes()  # fresh, never zeros


def check_puts(ctx, comms, seed):
    sizes = [0, 4, 1024, MiB, 64 * MiB]
    if ctx.shared_gpu and ctx.args.host_id:
        # UCX over TCP stages GPU memory through the host in 256 KiB fragments, each a
        # copy that waits for its turn on the GPU the two processes time-slice: 64 MiB
        # takes minutes here (the CI tests move 64 MiB over UCX on host memory).
        sizes = sizes[:-1] + [8 * MiB]
    offsets = [(3, 7), (19, 35), (16, 48)]  # mismatched, same-misalignment, aligned
    case = 0
    for n in sizes:
        for so, do in offsets:
            case += 1
            src, dst = SRC_BASE + so, DST_BASE + do
            for c in comms:  # fresh data at src; distinct junk around dst
                c.write(src, data(seed, c.rank, case, n))
                c.write(dst - 1, b"\xaa")
                c.write(dst + n, b"\x55")
            barrier(comms)
            for c in comms:
                kt.test_put(c, peer(c), dst, src, n, signal=True)
                kt.test_wait(c, peer(c))
            sync_all(comms)
            for c in comms:
                err, _ = kt.scratch(c)
                assert err == 0, "wait failed"
                got = c.read(dst, n)
                want = data(seed, peer(c), case, n)
                if got != want:
                    a, b = np.frombuffer(got, np.uint8), np.frombuffer(want, np.uint8)
                    bad = np.nonzero(a != b)[0]
                    raise AssertionError(f"put n={n} src={src} dst={dst} rank {c.rank}: "
                                         f"{bad.size} bytes differ, first at {bad[0]}")
                assert c.read(dst - 1, 1) == b"\xaa" and c.read(dst + n, 1) == b"\x55", \
                    f"put n={n} wrote outside its range"
            barrier(comms)


def check_ordering(ctx, comms, rounds=10000):
    for payload in (8, 4096):
        for c in comms:
            kt.scratch(c)
            kt.test_pingpong(c, peer(c), rounds, c.rank == 0, payload=payload,
                            src_off=SRC_BASE, dst_off=DST_BASE, check=True)
        sync_all(comms)
        for c in comms:
            err, ns = kt.scratch(c)
            assert err == 0, f"rank {c.rank}: {err} rounds saw stale data (payload {payload})"
        barrier(comms)


def expected_sum(blocks, threads, per_thread):
    gid = np.arange(blocks * threads, dtype=np.uint64)
    if not per_thread:
        gid = gid[gid % 32 == 0]
    return int(((gid * np.uint64(7919)) % np.uint64(2001)).astype(np.int64).sum() - 1000 * gid.size)


def check_atomics(ctx, comms, seed):
    off = DST_BASE + 8 * 1024
    # (blocks, threads, per_thread): every thread adds, or lane 0 of every warp;
    # port-channel runs push more triggers than the FIFO holds (back-pressure).
    port = comms[0].channel_kind(peer(comms[0])) == 2
    configs = [(16 if port else 64, 256, True), (66, 1024, False)]
    for i, (blocks, threads, per_thread) in enumerate(configs):
        init = {}
        for c in comms:
            v = int(np.random.default_rng([seed, c.rank, 99, i]).integers(-2**40, 2**40))
            init[c.rank] = v
            c.write(off, np.int64(v).tobytes())
        barrier(comms)
        for c in comms:
            kt.test_atomic(c, peer(c), off, blocks, threads, per_thread)
            kt.test_flush(c, peer(c))
            kt.test_signal(c, peer(c))
            kt.test_wait(c, peer(c))
        sync_all(comms)
        want_delta = expected_sum(blocks, threads, per_thread)
        for c in comms:
            err, _ = kt.scratch(c)
            assert err == 0, "flush/wait failed"
            got = int(np.frombuffer(c.read(off, 8), np.int64)[0])
            assert got == init[c.rank] + want_delta, \
                f"atomics {blocks}x{threads} per_thread={per_thread}: got {got}, want {init[c.rank] + want_delta}"
        barrier(comms)


def check_flush(ctx, comms, seed):
    n, src, dst = 3 * MiB + 5, SRC_BASE + 1, DST_BASE + 9
    for c in comms:
        c.write(src, data(seed, c.rank, 777, n))
    barrier(comms)
    for c in comms:
        kt.test_put(c, peer(c), dst, src, n, signal=False)
        kt.test_flush(c, peer(c))
    sync_all(comms)  # flush returned: the data must have landed
    for c in comms:
        err, _ = kt.scratch(c)
        assert err == 0, "flush failed"
    barrier(comms)  # orders the peer's read after my flush
    for c in comms:
        assert c.read(dst, n) == data(seed, peer(c), 777, n), f"rank {c.rank}: data missing after flush"
    barrier(comms)


def check_barrier(ctx, comms):
    barrier(comms, iters=1000)


def process_counts():
    threads = int([l for l in open("/proc/self/status") if l.startswith("Threads:")][0].split()[1])
    return threads, len(os.listdir("/proc/self/fd"))


def check_create_destroy(ctx, force_port):
    from jax_mscclpp_ep import native
    ep = native.ext
    dl = ctx.args.device_list
    devs = sorted(set(dl)) if not ctx.multi else [dl[ctx.args.rank]]

    def cycle():
        comms = ctx.create(64 * MiB, force_port=force_port)
        barrier(comms)
        ctx.close(comms)

    cycle()  # first use initialises contexts and peer mappings
    before = ([ep.mem_get_info(d)[0] for d in devs], process_counts())
    for _ in range(50):
        cycle()
    after = ([ep.mem_get_info(d)[0] for d in devs], process_counts())
    for fb, fa in zip(before[0], after[0]):
        assert fb - fa < 8 * MiB, f"GPU memory leaked: {(fb - fa) / MiB:.1f} MiB after 50 cycles"
    assert after[1][0] <= before[1][0], f"threads leaked: {before[1][0]} -> {after[1][0]}"
    assert after[1][1] <= before[1][1] + 2, f"fds leaked: {before[1][1]} -> {after[1][1]}"


def check_timeout(ctx, force_port):
    comms = ctx.create(MiB, force_port=force_port, timeout_s=0.5)
    try:
        t0 = time.perf_counter()
        for c in comms:
            kt.test_wait(c, peer(c))  # nobody signals
        msgs = []
        for c in comms:
            try:
                c.sync()
            except RuntimeError as e:
                msgs.append((c, str(e)))
        dt = time.perf_counter() - t0
        assert len(msgs) == len(comms), "a wait on a silent peer did not raise"
        for c, m in msgs:
            assert f"peer {peer(c)}" in m and f"rank {c.rank}" in m, f"unclear error: {m}"
        assert dt < 10, f"timeout took {dt:.1f}s"
        print(f"  timeout message: {msgs[0][1]}", flush=True)
    finally:
        ctx.close(comms)


def run(ctx):
    seed = ctx.args.seed
    # Two simulated hosts: every peer is a UCX port channel whatever force_port says.
    passes = [(True, "ucx")] if ctx.args.host_id else [(False, "memory"), (True, "port")]
    for force_port, kind in passes:
        comms = ctx.create(force_port=force_port)
        kinds = {c.rank: c.channel_kinds for c in comms}
        want = 2 if force_port else 1
        ok = all(k[peer_r] == want for r, k in kinds.items() for peer_r in range(2) if peer_r != r)
        if kind == "ucx":
            how = comms[0].describe_peer(peer(comms[0]))
            print(f"  rank {comms[0].rank} reaches its peer through: {how}", flush=True)
            ok = ok and how.startswith("ucx")
        ctx.check(f"{kind}: channel kinds {kinds}", lambda: None if ok else (_ for _ in ()).throw(
            AssertionError(f"expected kind {want}")))
        ctx.check(f"{kind}: put sizes/offsets", check_puts, ctx, comms, seed)
        # Kernels of two processes on one GPU time-slice (ms per round trip): fewer rounds.
        rounds = 300 if ctx.shared_gpu else 10000
        ctx.check(f"{kind}: signal->wait ordering {rounds} rounds", check_ordering, ctx, comms,
                  rounds)
        ctx.check(f"{kind}: concurrent signed atomicAdd", check_atomics, ctx, comms, seed)
        ctx.check(f"{kind}: flush", check_flush, ctx, comms, seed)
        ctx.check(f"{kind}: ring barrier x1000", check_barrier, ctx, comms)
        ctx.close(comms)
        ctx.check(f"{kind}: create/destroy x50 no leaks", check_create_destroy, ctx, force_port)
        ctx.check(f"{kind}: silent peer -> timeout error", check_timeout, ctx, force_port)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["single", "multi"], required=True)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "little"))
    ap.add_argument("--devices", default="0,1",
                    help="CUDA ordinal of each rank; '0,0' runs both ranks on one GPU (loopback)")
    ap.add_argument("--host-id", default="", help="this rank's JMEP_HOST_ID (simulated hosts)")
    args = ap.parse_args()
    if args.host_id:
        os.environ["JMEP_HOST_ID"] = args.host_id
    args.device_list = [int(d) for d in args.devices.split(",")]
    import jax
    if args.mode == "multi":
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}",
                                   num_processes=args.nproc, process_id=args.rank,
                                   local_device_ids=[args.device_list[args.rank]])
    ctx = Ctx(args)
    print(f"mode={args.mode} rank={args.rank} devices={args.devices} seed={args.seed}", flush=True)
    run(ctx)
    failed = sum(1 for _, ok in ctx.results if not ok)
    print(f"SUMMARY mode={args.mode} rank={args.rank} passed={len(ctx.results) - failed} "
          f"failed={failed}", flush=True)
    sys.stdout.flush()
    if args.mode == "multi" and args.rank == 0:
        time.sleep(3)  # rank 0 hosts the coordinator: let the peers finish their last checks
    os._exit(1 if failed else 0)  # skip interpreter teardown races with jax.distributed


if __name__ == "__main__":
    main()
