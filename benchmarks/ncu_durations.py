"""Median kernel duration per kernel name from `ncu --metrics gpu__time_duration.sum --csv`.

  python3 benchmarks/ncu_durations.py OUT.csv [--skip N]

--skip drops each kernel's first N launches (warm-up). Durations in us.
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
from collections import defaultdict

_SCALE = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6}


def durations(text):
    """{(kernel name, grid size): [us, ...]} in launch order."""
    lines = text.splitlines()
    start = next((i for i, s in enumerate(lines) if s.startswith('"ID"')), None)
    out = defaultdict(list)
    if start is None:
        return out
    for row in csv.DictReader(io.StringIO("\n".join(lines[start:]))):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        name = (row["Kernel Name"][:60], row.get("Grid Size", ""))
        value = float(row["Metric Value"].replace(",", ""))
        out[name].append(value * _SCALE.get(row.get("Metric Unit", "nsecond"), 1e-3))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--skip", type=int, default=0)
    a = ap.parse_args()
    with open(a.csv) as f:
        found = durations(f.read())
    if not found:
        print(f"no gpu__time_duration rows in {a.csv}")
    for (name, grid), xs in found.items():
        xs = xs[a.skip:]
        if xs:
            print(f"{name:60s} grid {grid:>12s} n={len(xs):4d} median {statistics.median(xs):7.2f} us "
                  f"(min {min(xs):.2f}, max {max(xs):.2f})")


if __name__ == "__main__":
    main()
