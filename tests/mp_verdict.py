"""What a group run says about one case: every rank's events (tests/multiprocess/
case_report.py) folded into passed / skipped / failed, with the failing ranks'
messages, and for a hang or crash the rank, how it ended and the case it was in."""

from __future__ import annotations

import dataclasses
import json
from signal import SIGKILL


@dataclasses.dataclass
class RankResult:
    rank: int
    code: int | None           # exit status (negative: killed by that signal)
    killed_by: str             # "" or why the launcher killed it ("timeout after 900 s", ...)
    events: list
    log: str                   # path of the rank's output

    @classmethod
    def read(cls, rank, code, killed_by, report, log):
        events = []
        try:
            with open(report) as f:
                events = [json.loads(ln) for ln in f if ln.strip()]
        except FileNotFoundError:
            pass
        return cls(rank, code, killed_by, events, log)

    def how_it_ended(self) -> str:
        if self.killed_by:
            return f"killed by the launcher ({self.killed_by})"
        if self.code is None:
            return "still running"
        return f"exit code {self.code}" if self.code >= 0 else f"killed by signal {-self.code}"

    def last_started(self) -> str:
        starts = [e["case"] for e in self.events if e["event"] == "start"]
        return starts[-1] if starts else "(none: it never started a case)"

    def log_tail(self, n=3000) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()[-n:]
        except FileNotFoundError:
            return "(no log)"


@dataclasses.dataclass
class GroupRun:
    name: str
    ranks: list
    elapsed_s: float


def rank_outcome(rr: RankResult, case: str):
    """(outcome, text) of one case on one rank: passed / skipped / failed / missing."""
    reports = [e for e in rr.events if e["event"] == "report" and e["case"] == case]
    failed = [e for e in reports if e["outcome"] == "failed"]
    if failed:
        return "failed", "\n".join(f"[{e['when']}] {e['text']}" for e in failed)
    skipped = [e for e in reports if e["outcome"] == "skipped"]
    if skipped:
        return "skipped", skipped[0]["text"]
    if any(e["when"] == "call" and e["outcome"] == "passed" for e in reports):
        return "passed", ""
    if any(e["event"] == "start" and e["case"] == case for e in rr.events):
        return "missing", (f"started this case and never finished it: {rr.how_it_ended()}\n"
                           f"--- rank {rr.rank} log tail ({rr.log}) ---\n{rr.log_tail()}")
    return "missing", (f"never ran this case: {rr.how_it_ended()} while in "
                       f"{rr.last_started()} (log {rr.log})")


def verdict(run: GroupRun, case: str):
    """(outcome, message) for the case across the group: "failed" if any rank failed it
    or did not finish it, "skipped" if every rank skipped it, else "passed"."""
    per_rank = [(rr.rank, *rank_outcome(rr, case)) for rr in run.ranks]
    bad = [(r, o, t) for r, o, t in per_rank if o in ("failed", "missing")]
    if bad:
        return "failed", f"{run.name} / {case}:\n" + "\n".join(
            f"rank {r} {'failed' if o == 'failed' else 'did not report'}: {t}" for r, o, t in bad)
    kinds = {o for _, o, _ in per_rank}
    if kinds == {"skipped"}:
        return "skipped", per_rank[0][2]
    if kinds != {"passed"}:
        return "failed", f"{run.name} / {case}: ranks disagree: " + ", ".join(
            f"rank {r} {o} {t[:200]}" for r, o, t in per_rank)
    return "passed", ""


def died_on_purpose(rank, code, may_die) -> bool:
    """The rank ended by its own SIGKILL, as its configuration says it will."""
    return rank in may_die and code == -SIGKILL


def exit_verdict(run: GroupRun, *, clean=False, may_die=()):
    """(ok, message): every rank exited 0 and was not killed (the ranks in may_die may end by
    their own SIGKILL); clean: nor did any log a traceback or a RuntimeWarning (Buffers
    released quietly at exit)."""
    bad = [f"rank {rr.rank}: {rr.how_it_ended()} (last case {rr.last_started()})"
           for rr in run.ranks
           if rr.killed_by or (rr.code != 0 and not died_on_purpose(rr.rank, rr.code, may_die))]
    if clean:
        for rr in run.ranks:
            tail = rr.log_tail(1 << 20)
            if "Traceback" in tail or "RuntimeWarning" in tail:
                bad.append(f"rank {rr.rank} logged a traceback or warning:\n{tail[-3000:]}")
    return not bad, f"{run.name}: " + "\n".join(bad)
