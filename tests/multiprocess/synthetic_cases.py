"""Cases that go wrong on purpose, for tests/test_mp_harness.py: the launcher must
report each by name and rank (a failure, a skip, a hang, a crash) and carry on with
the rest. No JAX here, so a group of them starts in a second."""

import os
import signal
import time

import pytest

from mp_env import RankSettings

ME = RankSettings.from_env()
LAST = ME.num_processes - 1
MODE = os.environ.get("JMEP_MP_SYNTHETIC", "")   # "hang", "crash" or "sigkill": what goes wrong


def test_passes():
    assert ME.num_processes >= 2


def test_fails_on_last_rank():
    assert ME.process_id != LAST, f"deliberate failure on rank {ME.process_id}"


def test_skips():
    pytest.skip("deliberate skip")


def test_goes_wrong_on_rank_0():
    """hang: rank 0 never returns (the group limit ends it); crash: rank 0 dies, and the
    others wait for it, as peers in a collective would."""
    if MODE == "hang" and ME.process_id == 0:
        time.sleep(3600)
    if MODE == "crash":
        if ME.process_id == 0:
            os._exit(3)
        time.sleep(3600)


def test_after_the_trouble():
    assert True


def test_last_rank_kills_itself():
    """sigkill: the last rank reports its case and SIGKILLs itself, as a lost rank does; the
    others go on longer than the launcher's grace after a failure, which must not start."""
    if MODE != "sigkill":
        return
    if ME.process_id == LAST:
        import case_report
        case_report.record_exit("killed itself on purpose")
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(5)
