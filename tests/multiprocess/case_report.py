"""pytest plugin for rank processes: one JSON line per event in the file named by
JMEP_MP_REPORT, written and flushed as it happens, so a rank that hangs or crashes
still leaves "started case X" behind and the launcher can name the case.

Events: {"event": "start", "case"}, {"event": "report", "case", "when", "outcome",
"text"}, {"event": "finish", "exitstatus"}. Also `--list-cases FILE`: write the
collected case ids with their markers as JSON and run nothing."""

from __future__ import annotations

import json
import os
import time

import pytest

_state = {"file": None, "current": None}


def write_event(**event) -> None:
    f = _state["file"]
    if f is None:
        return
    event["t"] = round(time.time(), 3)
    f.write(json.dumps(event) + "\n")
    f.flush()
    os.fsync(f.fileno())  # a killed rank must not lose what it said


def record_exit(text: str) -> None:
    """For a case that ends its process on purpose (a peer meant to die): its outcome."""
    write_event(event="report", case=_state["current"], when="call", outcome="passed", text=text)
    write_event(event="finish", exitstatus=0)


def pytest_addoption(parser):
    parser.addoption("--list-cases", default="", help="write the collected case ids (JSON) here")


def pytest_configure(config):
    path = os.environ.get("JMEP_MP_REPORT", "")
    if path and not config.getoption("list_cases"):
        _state["file"] = open(path, "a")


def pytest_collection_finish(session):
    out = session.config.getoption("list_cases")
    if out:
        cases = [{"case": it.nodeid, "marks": sorted({m.name for m in it.iter_markers()})}
                 for it in session.items]
        with open(out, "w") as f:
            json.dump(cases, f)


def pytest_runtest_logstart(nodeid, location):
    _state["current"] = nodeid
    write_event(event="start", case=_state["current"])


def pytest_runtest_logreport(report):
    text = ""
    if report.failed:  # the seed makes the failing data reproducible
        text = f"(group seed {os.environ.get('JMEP_MP_SEED', '?')})\n{report.longreprtext}"
    elif report.skipped and isinstance(report.longrepr, tuple):
        text = report.longrepr[2]  # the skip reason
    write_event(event="report", case=report.nodeid, when=report.when,
                outcome=report.outcome, text=text[-20000:])


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if _state["file"] is not None:
        write_event(event="finish", exitstatus=int(getattr(config, "_mp_exitstatus", 0)))
        _state["file"].close()
        _state["file"] = None


def pytest_sessionfinish(session, exitstatus):
    session.config._mp_exitstatus = exitstatus
