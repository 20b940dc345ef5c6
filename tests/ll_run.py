"""Run one LL configuration (tests/ll_configs.py) from the shell, as the GPU scripts do:

  python tests/ll_run.py CONFIG [-k EXPR] [--timeout S] [--wrap 'CMD ... {rank} ...']
  python tests/ll_run.py --list

Prints PASS / FAIL / SKIP per case (with the failing ranks' messages), then SUMMARY;
exit status 1 if any case failed or a rank did not exit cleanly. -k narrows the cases
inside the ranks' pytest; --wrap puts a command before each rank's python (e.g.
compute-sanitizer, {rank} in its log file name). Logs: JMEP_LL_LOG_DIR."""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ll_configs  # noqa: E402
from mp_parent import short_id  # noqa: E402
from mp_verdict import exit_verdict, verdict  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("config", nargs="?")
    ap.add_argument("-k", default="", help="pytest -k expression over the cases (e.g. 'basic_fp8')")
    ap.add_argument("--timeout", type=float, default=None, help="group limit, seconds")
    ap.add_argument("--wrap", default="", help="command before each rank's python; {rank} replaced")
    ap.add_argument("--list", action="store_true", help="list the configurations")
    a = ap.parse_args(argv)
    configs = ll_configs.by_name()
    if a.list or not a.config:
        for name, c in configs.items():
            print(f"{name:50s} {c.skip_reason() or 'runnable here'}")
        return 0
    return report(configs[a.config], k=a.k, timeout_s=a.timeout, wrap=a.wrap)


def report(config, *, k="", timeout_s=None, wrap="", targets=None) -> int:
    """Run the configuration's group and print each case's verdict; the exit status."""
    why = config.skip_reason()
    if why:
        print(f"SKIP {config.name}: {why}")
        return 0
    launch = config.launch(targets, ["-k", k] if k else [], wrap=wrap)
    if timeout_s:
        launch.timeout_s = timeout_s
    run = launch.run()
    cases = []
    for rr in run.ranks:
        cases += [e["case"] for e in rr.events if e["event"] == "start" and e["case"] not in cases]
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for case in cases:
        outcome, msg = verdict(run, case)
        counts[outcome] += 1
        print(f"{ {'passed': 'PASS', 'failed': 'FAIL', 'skipped': 'SKIP'}[outcome]} {short_id(case)}"
              + (f"\n{msg}" if outcome == "failed" else f" ({msg})" if msg else ""), flush=True)
    ok, msg = exit_verdict(run, clean=config.clean_exit, may_die=config.dies)
    if not ok:
        print(f"FAIL exit: {msg}")
    print(f"SUMMARY {config.name}: {counts['passed']} passed, {counts['failed']} failed, "
          f"{counts['skipped']} skipped in {run.elapsed_s:.0f} s; logs in "
          f"{os.path.dirname(run.ranks[0].log)}")
    return 0 if ok and not counts["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
