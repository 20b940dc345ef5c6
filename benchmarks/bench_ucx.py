"""The UCX connection (libjmep_ucx.so) between two processes on host memory (TCP
loopback unless UCX_TLS says otherwise): round trip, put bandwidth, and what one
signal call costs the sender.

python benchmarks/bench_ucx.py [--signals rma|am] [--out PREFIX]

Measures, rank 0 -> rank 1 (rank 1 only progresses, and echoes):
  - round trip: put 8 B + store(sem, i); rank 1 sees sem == i and stores i back;
    the median over --rt-iters rounds, in us;
  - put bandwidth, 4 KiB .. 64 MiB (x4 steps): per size, a rep is many puts then
    flush(1); the median GB/s over --reps reps (after one warm-up rep);
  - the time of the add() call itself on the sender (median), after no new data
    (goes at once) and after an 8 B put (held back until a flush completes), next to
    a no-op ctypes call (outstanding()) for the Python overhead in both.
Writes PREFIX.json and PREFIX.md with --out; prints the markdown table either way.
The two ranks find each other through address files in a temporary directory.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KiB, MiB = 1 << 10, 1 << 20
SEM, ACK, STOP, CNT, SPARE = 0, 8, 16, 24, 32  # control words
DATA = 4096
REGION = DATA + 64 * MiB


def load_ucx():
    """jax_mscclpp_ep.ucx by path (ctypes only; importing the package would import jax)."""
    spec = importlib.util.spec_from_file_location(
        "_jmep_ucx_bench", os.path.join(ROOT, "jax_mscclpp_ep", "ucx.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- one rank -------------------------------------------------------------------------

class Rank:
    def __init__(self, args):
        self.args, self.rank, self.dir = args, args.rank, args.dir
        self.ucx = load_ucx()
        raw = np.zeros(REGION + 4096, np.uint8)
        start = (-raw.ctypes.data) % 4096
        self._raw, self.mem = raw, raw[start:start + REGION]
        self.ep = self.ucx.UcxEndpoint(self.rank, 2, self.mem.ctypes.data, REGION,
                                       signal_mode=args.signals, timeout_s=30.0)
        self.peer = 1 - self.rank

    def word(self, off):
        return self.mem[off:off + 8].view(np.uint64)

    def write_file(self, name, data=b""):
        tmp = os.path.join(self.dir, f".{name}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(self.dir, name))

    def wait_file(self, name, progress, timeout=60.0):
        p, t0 = os.path.join(self.dir, name), time.monotonic()
        while not os.path.exists(p):
            if progress:
                self.ep.progress()
            else:
                time.sleep(0.001)
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"rank {self.rank}: no {name} after {timeout:.0f} s")
        with open(p, "rb") as f:
            return f.read()

    def connect(self):
        self.write_file(f"addr_{self.rank}.bin", self.ep.address())
        self.ep.connect(self.peer, self.wait_file(f"addr_{self.peer}.bin", False))

    def finish(self):
        self.ep.flush(-1)
        self.write_file(f"end_a_{self.rank}")
        self.wait_file(f"end_a_{self.peer}", True)
        self.write_file(f"end_b_{self.rank}")
        self.wait_file(f"end_b_{self.peer}", False)
        self.ep.close()

    def wait_word(self, w, value, timeout=30.0):
        ep, t0, k = self.ep, time.monotonic(), 0
        while int(w[0]) != value:
            if ep.progress() == 0:
                os.sched_yield()  # see responder()
            k += 1
            if k & 1023 == 0 and time.monotonic() - t0 > timeout:
                raise TimeoutError(f"rank {self.rank}: word is {int(w[0])}, waited for {value}")


def responder(r: Rank):
    """Rank 1: progress; echo every new sem value back as a store to rank 0's ack."""
    sem, stop, ep = r.word(SEM), r.word(STOP), r.ep
    last, t0 = 0, time.monotonic()
    out = {}
    try:
        while not stop[0]:
            s = int(sem[0])
            if s != last:
                last = s
                ep.store(0, ACK, s)
            if ep.progress() == 0:
                # Let other threads run (UCX's async thread, the other rank on a small
                # machine): two ranks spinning on two cores otherwise stall it for a
                # scheduler tick (~10 ms round trips).
                os.sched_yield()
            if time.monotonic() - t0 > 600:
                raise TimeoutError("rank 1: no stop after 600 s")
        r.finish()
    except r.ucx.UcxError as e:  # rank 0 gave up after an error of its own, and closed
        r.wait_file("rank0.json", False, timeout=10)
        out["peer_error"] = str(e)
        r.ep.close()
    out["cnt"] = int(r.word(CNT)[0])
    with open(os.path.join(r.dir, "rank1.json"), "w") as f:
        json.dump(out, f)


def driver(r: Rank):
    a, ep, mem = r.args, r.ep, r.mem
    ack = r.word(ACK)
    res = {}
    mem[DATA:] = np.random.default_rng().integers(1, 256, REGION - DATA, dtype=np.uint8)
    seq = 0

    def rtt_round():
        nonlocal seq
        seq += 1
        t = time.perf_counter_ns()
        ep.put(1, DATA, DATA, 8)
        ep.store(1, SEM, seq)
        r.wait_word(ack, seq)
        return time.perf_counter_ns() - t

    for _ in range(200):
        rtt_round()
    us = sorted(rtt_round() / 1e3 for _ in range(a.rt_iters))
    res["round_trip_us"] = {"median": statistics.median(us), "p10": us[len(us) // 10],
                            "p90": us[len(us) * 9 // 10], "min": us[0], "iters": a.rt_iters}
    res["transports"] = ep.describe(1)

    bw = []
    size = a.min_size
    while size <= a.max_size:
        count = max(1, min(a.max_puts, a.rep_bytes // size))
        span = REGION - DATA - size
        offs = [DATA + (k * size) % max(span, 1) for k in range(count)]
        gbs = []
        for rep in range(a.reps + 1):
            t = time.perf_counter_ns()
            for o in offs:
                ep.put(1, o, o, size)
            ep.flush(1)
            dt = (time.perf_counter_ns() - t) / 1e9
            if rep:
                gbs.append(count * size / dt / 1e9)
        bw.append({"bytes": size, "puts_per_rep": count, "reps": a.reps,
                   "gbps_median": statistics.median(gbs), "gbps_max": max(gbs)})
        size *= 4
    res["put_bandwidth"] = bw

    def timed(call, n, before=None):
        ts = []
        for k in range(n):
            if before is not None:
                before()
            t = time.perf_counter_ns()
            call()
            ts.append(time.perf_counter_ns() - t)
            if k % 256 == 255:
                ep.flush(1)  # untimed: keeps the outstanding requests bounded
        ep.flush(1)
        return {"median_us": statistics.median(ts) / 1e3, "p90_us": sorted(ts)[n * 9 // 10] / 1e3}

    n = a.signal_iters
    put8 = lambda: ep.put(1, DATA, DATA, 8)  # noqa: E731
    sc = res["signal_call"] = {"iters": n, "ctypes_noop": timed(ep.outstanding, n)}
    sc["store_no_data"] = timed(lambda: ep.store(1, SPARE, 1), n)
    sc["store_after_put"] = timed(lambda: ep.store(1, SPARE, 1), n, put8)
    res["expected_cnt"] = 2 * n
    try:
        sc["add_no_data"] = timed(lambda: ep.add(1, CNT, 1), n)
        sc["add_after_put"] = timed(lambda: ep.add(1, CNT, 1), n, put8)
        ep.flush(1)
        ep.store(1, STOP, 1)
        r.finish()
    except r.ucx.UcxError as e:  # errors are sticky: report what we have and stop
        sc["add_error"] = str(e)
        r.ep.close()
    with open(os.path.join(r.dir, "rank0.json"), "w") as f:
        json.dump(res, f)


def run_rank(args):
    os.environ.setdefault("UCX_TLS", "tcp")
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    r = Rank(args)
    r.connect()
    (driver if r.rank == 0 else responder)(r)


# ---- the launcher -----------------------------------------------------------------------

def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown(rep):
    m, s = rep["machine"], rep["results"]
    rt, sc = s["round_trip_us"], s["signal_call"]
    out = [f"# UCX connection, 2 processes on host memory ({rep['signals']} signals)", "",
           f"machine `{m['node']}`, {m['cpu']} ({m['cores']} cores); {rep['ucx_version']}; "
           f"UCX_TLS={rep['ucx_tls']}", "",
           "| measurement | median | notes |", "|---|---:|---|",
           f"| round trip: put 8 B + store, echoed store | {rt['median']:.1f} us | "
           f"p10 {rt['p10']:.1f}, p90 {rt['p90']:.1f}, min {rt['min']:.1f} us, {rt['iters']} rounds |",
           *[f"| {call}() call, {when} | {sc[key]['median_us']:.2f} us | p90 {sc[key]['p90_us']:.2f} us |"
             if key in sc else f"| {call}() call, {when} | failed | {sc.get('add_error', '')} |"
             for call in ("add", "store")
             for key, when in [(f"{call}_no_data", "no new data before it"),
                               (f"{call}_after_put", "after an 8 B put (held back)")]],
           f"| no-op ctypes call (outstanding()) | {sc['ctypes_noop']['median_us']:.2f} us | "
           f"Python + ctypes share of the above |", "",
           "| put size | puts per rep | GB/s (median) | GB/s (best) |", "|---:|---:|---:|---:|"]
    for b in s["put_bandwidth"]:
        n = b["bytes"]
        size = f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"
        out.append(f"| {size} | {b['puts_per_rep']} | {b['gbps_median']:.2f} | {b['gbps_max']:.2f} |")
    out += ["", f"signals checked on rank 1: {rep['signals_checked']}", ""]
    return "\n".join(out)


def launch(args):
    ucx = load_ucx()
    version = ucx.version()
    env = dict(os.environ)
    env.setdefault("UCX_TLS", "tcp")
    env.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench_ucx_") as d:
        passthrough = ["--signals", args.signals, "--rt-iters", str(args.rt_iters),
                       "--reps", str(args.reps), "--min-size", str(args.min_size),
                       "--max-size", str(args.max_size), "--signal-iters", str(args.signal_iters),
                       "--rep-bytes", str(args.rep_bytes), "--max-puts", str(args.max_puts)]
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--rank", str(r),
                                   "--dir", d, *passthrough], env=env) for r in range(2)]
        try:
            rcs = [p.wait(timeout=args.timeout) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if rcs != [0, 0]:
            sys.exit(f"bench_ucx: ranks exited with {rcs}")
        with open(os.path.join(d, "rank0.json")) as f:
            results = json.load(f)
        with open(os.path.join(d, "rank1.json")) as f:
            cnt = json.load(f)["cnt"]
    add_error = results["signal_call"].get("add_error")
    rep = {
        "benchmark": "bench_ucx", "signals": args.signals, "ucx_version": version,
        "ucx_tls": env["UCX_TLS"],
        "machine": {"node": platform.node(), "cpu": cpu_model(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
        "signals_checked": (f"no: add() failed ({add_error})" if add_error else
                            "ok" if cnt == results["expected_cnt"] else
                            f"counter {cnt}, expected {results['expected_cnt']}"),
        "wall_s": round(time.monotonic() - t0, 2),
        "results": results,
    }
    md = markdown(rep)
    print(md)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(rep, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(md)
        print(f"wrote {args.out}.json, {args.out}.md")
    if add_error:
        sys.exit(f"bench_ucx: add() failed with {args.signals} signals: {add_error}")
    if cnt != results["expected_cnt"]:
        sys.exit(f"bench_ucx: rank 1's counter is {cnt}, expected {results['expected_cnt']}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--signals", choices=["rma", "am"], default="rma")
    ap.add_argument("--out", help="write PREFIX.json and PREFIX.md")
    ap.add_argument("--rt-iters", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--min-size", type=int, default=4 * KiB)
    ap.add_argument("--max-size", type=int, default=64 * MiB)
    ap.add_argument("--rep-bytes", type=int, default=128 * MiB, help="bytes put per rep (at most)")
    ap.add_argument("--max-puts", type=int, default=4096, help="puts per rep (at most)")
    ap.add_argument("--signal-iters", type=int, default=5000)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    assert args.max_size <= 64 * MiB, "the region holds 64 MiB of data"
    if args.rank is None:
        launch(args)
    else:
        run_rank(args)


if __name__ == "__main__":
    main()
