"""The multi-process harness on this machine's CPU: cases that fail, skip, hang or
crash on purpose are reported by name and rank (tests/multiprocess/synthetic_cases.py),
and a CPU configuration of the LL cases runs through the launcher case by case."""

import pytest

import ll_configs
from mp_env import RankSettings
from mp_launch import Launch
from mp_parent import GroupRuns, case_params, exit_params
from mp_verdict import exit_verdict, verdict

SYNTH = "synthetic_cases.py::"


def synthetic(mode, timeout_s=60.0, grace_s=60.0, nproc=2, may_die=()):
    return Launch(f"synthetic_{mode}", ["synthetic_cases.py"], RankSettings(platform="cpu"),
                  nproc=nproc, env={"JMEP_MP_SYNTHETIC": mode}, timeout_s=timeout_s,
                  grace_s=grace_s, may_die=may_die).run()


def test_failure_skip_and_hang_are_reported_by_case():
    run = synthetic("hang", timeout_s=10.0)
    assert verdict(run, SYNTH + "test_passes") == ("passed", "")
    outcome, msg = verdict(run, SYNTH + "test_fails_on_last_rank")
    assert outcome == "failed" and "rank 1 failed" in msg and "deliberate failure on rank 1" in msg
    assert "rank 0" not in msg.split("\n", 1)[1], msg  # only the rank that failed is named
    assert verdict(run, SYNTH + "test_skips") == ("skipped", "Skipped: deliberate skip")
    outcome, msg = verdict(run, SYNTH + "test_goes_wrong_on_rank_0")
    assert outcome == "failed", msg
    assert "rank 0 did not report: started this case and never finished it" in msg, msg
    assert "group timeout after 10 s" in msg, msg
    outcome, msg = verdict(run, SYNTH + "test_after_the_trouble")
    assert outcome == "failed" and "rank 0 did not report: never ran this case" in msg, msg
    assert "while in synthetic_cases.py::test_goes_wrong_on_rank_0" in msg, msg
    assert "rank 1" not in msg, msg  # rank 1 ran it and passed
    ok, msg = exit_verdict(run)
    assert not ok and "rank 0: killed by the launcher" in msg, msg
    assert run.elapsed_s < 40, run.elapsed_s


def test_crash_names_the_case_and_ends_the_waiting_peers():
    run = synthetic("crash", timeout_s=120.0, grace_s=3.0)
    outcome, msg = verdict(run, SYNTH + "test_goes_wrong_on_rank_0")
    assert outcome == "failed", msg
    assert "rank 0 did not report: started this case and never finished it: exit code 3" in msg, msg
    assert "rank 1 did not report: started this case and never finished it: killed by the " \
           "launcher (3 s after another rank failed)" in msg, msg
    assert run.elapsed_s < 60, f"the waiting rank was not ended soon after the crash: {run.elapsed_s}"


def test_a_rank_killing_itself_on_purpose_is_no_failure():
    """A configuration's `dies` ranks (the lost rank of mask_lost_rank) may end by their own
    SIGKILL: their case passes as recorded, the others are not ended after the grace."""
    run = synthetic("sigkill", grace_s=3.0, nproc=3, may_die=(2,))
    assert verdict(run, SYNTH + "test_last_rank_kills_itself") == ("passed", "")
    assert all(not rr.killed_by for rr in run.ranks), [rr.killed_by for rr in run.ranks]
    assert exit_verdict(run, may_die=(2,))[0], exit_verdict(run, may_die=(2,))[1]
    ok, msg = exit_verdict(run)
    assert not ok and "rank 2: killed by signal 9" in msg, msg


CPU_CONFIGS = list(ll_configs.CPU.values())


@pytest.fixture(scope="module")
def groups(request):
    return GroupRuns(CPU_CONFIGS, request.session)


@pytest.mark.parametrize("config,case", case_params(CPU_CONFIGS))
def test_ll_on_cpu(groups, config, case):
    """The LL cases in processes of one CPU device each (jax.distributed, gloo): the
    launcher, the group fixture and the per-case results, on the pure-JAX reference."""
    groups.check_case(config, case)


@pytest.mark.parametrize("config", exit_params(CPU_CONFIGS))
def test_ll_on_cpu_exit(groups, config):
    groups.check_exit(config)
