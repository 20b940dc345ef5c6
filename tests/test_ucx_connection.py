"""The UCX connection library (libjmep_ucx.so, ffi/ucx/jmep_ucx.h) between processes
on host memory over TCP loopback: puts, exact concurrent atomics, put-then-signal
ordering, flush, create/destroy without leaks, and a killed peer's error.

Each test runs tests/_ucx_worker.py as one process per rank with a fresh seed; a
failure prints the seed and the command lines that reproduce it. Skipped when
the library is not built here, unless JMEP_EXPECT_UCX=1 (CI), where that fails.
"""
import os
import secrets
import shlex
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "_ucx_worker.py")
TIMEOUT_S = float(os.environ.get("JMEP_UCX_TEST_TIMEOUT", "120"))
EXPECT_UCX = os.environ.get("JMEP_EXPECT_UCX") == "1"

sys.path.insert(0, HERE)
from _ucx_worker import load_ucx  # noqa: E402

try:
    ucx = load_ucx(prefer_package=True)
    AVAILABLE = ucx.available()
    REASON = "" if AVAILABLE else (ucx._load_error or "libjmep_ucx.so does not load")
except Exception as e:  # noqa: BLE001 - the module itself does not load
    ucx, AVAILABLE, REASON = None, False, f"jax_mscclpp_ep.ucx does not import: {e!r}"

SIGNALS = ["rma", "am"]
# Remote atomics need a transport that has them (InfiniBand/RoCE); over TCP only
# signals by active message can add, and an RMA add must fail clearly instead.
TCP_ONLY = set(os.environ.get("UCX_TLS", "tcp").split(",")) <= {"tcp", "^ib"}


def _add_case(case, signals):
    return "rma_add_unsupported" if signals == "rma" and TCP_ONLY else case


@pytest.fixture(autouse=True)
def _need_ucx():
    if not AVAILABLE:
        if EXPECT_UCX:
            pytest.fail(f"JMEP_EXPECT_UCX=1 but the UCX connection is unavailable: {REASON}")
        pytest.skip(REASON)


def _env():
    env = dict(os.environ)
    env.setdefault("UCX_TLS", "tcp")
    # the library this pytest process loaded (the installed package), not the source tree's
    env.setdefault("JMEP_UCX_LIBRARY", ucx.library_path())
    env.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_case(tmp_path, case, nranks, signals="rma", expect_rc=None, timeout=TIMEOUT_S):
    """Runs the case's ranks at once; returns their outputs. Fails (with the seed, the
    commands to rerun it, and every rank's output) unless each rank exits with its
    expected code (0 unless expect_rc says) within the timeout and those with 0 print
    PASS. Once a rank fails, the others get 5 s (they see TMPDIR/ABORT) and are killed."""
    expect_rc = {r: 0 for r in range(nranks)} | (expect_rc or {})
    seed = secrets.randbits(31)
    d = tmp_path / "x"
    d.mkdir()
    def cmd(r, dir_arg):
        return [sys.executable, WORKER, "--rank", str(r), "--nranks", str(nranks), "--case", case,
                "--dir", dir_arg, "--seed", str(seed), "--signals", signals]

    cmds = [cmd(r, str(d)) for r in range(nranks)]
    logs = [open(tmp_path / f"rank{r}.log", "w+") for r in range(nranks)]
    t0 = time.monotonic()
    procs = [subprocess.Popen(c, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT)
             for c, f in zip(cmds, logs)]
    timed_out, first_bad = False, None
    try:
        while True:
            rcs = [p.poll() for p in procs]
            if all(rc is not None for rc in rcs):
                break
            now = time.monotonic()
            if first_bad is None and any(rc is not None and rc != expect_rc[r]
                                         for r, rc in enumerate(rcs)):
                first_bad = now
            if first_bad is not None and now - first_bad > 5:
                break
            if now - t0 > timeout:
                timed_out = True
                break
            time.sleep(0.02)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    wall = time.monotonic() - t0
    outs = []
    for f in logs:
        f.seek(0)
        outs.append(f.read())
        f.close()
    rcs = [p.returncode for p in procs]
    ok = not timed_out and all(rc == expect_rc[r] for r, rc in enumerate(rcs)) and all(
        f"PASS {case}" in out for r, out in enumerate(outs) if expect_rc[r] == 0)
    for r, out in enumerate(outs):
        print(f"---- rank {r} (rc {rcs[r]}) ----\n{out}")
    if not ok:
        what = f"timed out after {timeout:.0f} s" if timed_out else f"exit codes {rcs}"
        lines = [f"case {case} signals={signals} seed={seed}: {what} (expected "
                 f"{[expect_rc[r] for r in range(nranks)]}), {wall:.1f} s",
                 "rerun: D=$(mktemp -d); " + " & ".join(
                     " ".join(shlex.quote(a) for a in cmd(r, "DIR")).replace("DIR", '"$D"')
                     for r in range(nranks)) + " & wait"]
        for r, out in enumerate(outs):
            fails = [ln for ln in out.splitlines() if ln.startswith("FAIL")]
            lines.append(f"rank {r} rc={rcs[r]}: " + (fails[0] if fails else "(no FAIL line)"))
        for r, out in enumerate(outs):
            lines.append(f"---- rank {r} output (tail) ----\n{out[-3000:]}")
        pytest.fail("\n".join(lines), pytrace=False)
    return outs


def test_library_loads():
    v = ucx.version()
    assert "UCX" in v, v


@pytest.mark.parametrize("signals", SIGNALS)
def test_puts_exact(tmp_path, signals):
    """0 B, 4 B, 1 KiB, 1 MiB, 64 MiB at odd offsets: destination exact, neighbours intact."""
    run_case(tmp_path, "puts", 2, signals)


@pytest.mark.parametrize("signals", SIGNALS)
def test_concurrent_signed_adds(tmp_path, signals):
    """2 ranks x 4 threads of signed int64 adds into rank 0's words: sums exact (rma over
    TCP, which has no remote atomics: the add fails with a clear error instead)."""
    case = _add_case("atomics", signals)
    run_case(tmp_path, case, 3 if case == "atomics" else 2, signals)


@pytest.mark.parametrize("signal_op", ["store", "add"])
@pytest.mark.parametrize("signals", SIGNALS)
def test_put_then_signal_ordering(tmp_path, signals, signal_op):
    """10,000 rounds of put + signal without flush: the data is there when the signal is."""
    case = f"order_{signal_op}"
    run_case(tmp_path, _add_case(case, signals) if signal_op == "add" else case, 2, signals)


def test_flush_completes_puts(tmp_path):
    """After flush(peer) / flush(-1) returns, every earlier put is in the peer's memory."""
    run_case(tmp_path, "flush", 2, "rma")


@pytest.mark.parametrize("signals", SIGNALS)
def test_create_destroy_cycles_no_leak(tmp_path, signals):
    """50 create/connect/round/close cycles: no growth in fds or threads."""
    run_case(tmp_path, "cycles", 2, signals)


@pytest.mark.parametrize("signals", SIGNALS)
def test_killed_peer_errors_within_timeout(tmp_path, signals):
    """A SIGKILLed peer: UcxError naming peer 1 within timeout + 1 s, sticky, close bounded."""
    outs = run_case(tmp_path, "killed", 2, signals, expect_rc={1: -9})
    assert "killing myself" in outs[1]


@pytest.mark.parametrize("signals", SIGNALS)
def test_killed_peer_isolated(tmp_path, signals):
    """With peer isolation a SIGKILLed peer is lost alone: the others are still served."""
    outs = run_case(tmp_path, "killed_isolated", 3, signals, expect_rc={2: -9})
    assert "killing myself" in outs[2]


@pytest.mark.parametrize("signals", SIGNALS)
def test_hung_peer_errors_within_timeout(tmp_path, signals):
    """A SIGSTOPped peer (no socket closes): flush gives up after timeout_s, naming peer 1."""
    outs = run_case(tmp_path, "stopped", 2, signals, expect_rc={1: -9})
    assert "stopping myself" in outs[1]
