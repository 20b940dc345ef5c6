"""The parent side of the multi-process tests: one pytest item per (configuration,
case), each configuration's group launched once (only the cases selected in this
session), and each item's result taken from every rank (tests/mp_verdict.py)."""

from __future__ import annotations

import pytest

from mp_launch import CASES_DIR, list_cases
from mp_verdict import exit_verdict, verdict


def short_id(case: str) -> str:
    """"ll_cases.py::test_step[basic_bf16]" -> "step-basic_bf16" (what -k matches)."""
    func = case.split("::")[1]
    return func[len("test_"):].replace("[", "-").rstrip("]")


def config_marks(c, marks=()):
    """The marks every item of configuration c carries: marks, slow, its known failure."""
    return [*marks] + ([pytest.mark.slow] if c.slow else []) + (
        [pytest.mark.xfail(reason=c.known_failure, strict=False)] if c.known_failure else [])


def case_params(configs, marks=()):
    """pytest.param(config name, case node id) for every case of every configuration;
    a configuration that cannot run here is one skipped item saying why."""
    out = []
    for c in configs:
        m = config_marks(c, marks)
        why = c.skip_reason()
        if why:
            fail = why.startswith("FAIL: ")
            out.append(pytest.param(c.name, "", id=f"{c.name}/(all cases)", marks=m + [
                pytest.mark.xfail(reason=why, run=False, strict=True) if fail
                else pytest.mark.skip(reason=why)]))
            continue
        for case in list_cases(c.files, c.platform):
            if c.selects(case):
                out.append(pytest.param(c.name, case["case"], id=f"{c.name}/{short_id(case['case'])}",
                                        marks=m))
    return out


def exit_params(configs, marks=()):
    return [pytest.param(c.name, id=c.name, marks=config_marks(c, marks)
                         + ([pytest.mark.skip(reason=c.skip_reason())] if c.skip_reason() else []))
            for c in configs]


class GroupRuns:
    """Each configuration's group, launched the first time one of its items asks."""

    def __init__(self, configs, session):
        self.configs = {c.name: c for c in configs}
        self.session = session
        self.runs = {}

    def selected_cases(self, name):
        cases = []
        for item in self.session.items:
            p = getattr(getattr(item, "callspec", None), "params", {})
            if p.get("config") == name and p.get("case"):
                cases.append(p["case"])
        return cases

    def run(self, name):
        if name not in self.runs:
            cases = self.selected_cases(name)
            c = self.configs[name]
            launch = c.launch([f"{CASES_DIR}/{x}" for x in cases] if cases else None)
            self.runs[name] = launch.run()
        return self.runs[name]

    def check_case(self, name, case):
        outcome, message = verdict(self.run(name), case)
        if outcome == "skipped":
            pytest.skip(message)
        if outcome == "failed":
            pytest.fail(message, pytrace=False)

    def check_exit(self, name):
        run = self.run(name)
        c = self.configs[name]
        ok, message = exit_verdict(run, clean=c.clean_exit, may_die=c.dies)
        assert ok, message
