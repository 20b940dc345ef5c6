"""ncu's per-instruction warp samples summed per CUDA source line (issue 14).

ncu's source page, printed as SASS only, does not say which source line an instruction
came from; a cubin of the same build compiled with -lineinfo does. This joins the two by
instruction index (the check: both list the same number of instructions) and prints, per
source line, the instructions there and the samples on them, for the instructions that
ran a given number of warp-times per launch (e.g. 100..140 at T = 1: the paths one warp
a block runs, i.e. a call's serial critical path, not the barrier waits of the other 15).

  ncu -k regex:ll_dispatch --launch-count 4 --cache-control none --clock-control none \\
      --warp-sampling-interval 0 --section SourceCounters --page source --print-source sass \\
      --csv python3 benchmarks/ncu_ll.py --tokens 1 > X.csv
  nvcc ... -lineinfo -cubin ffi/kernels/ll_dispatch.cu -o d.cubin; nvdisasm -g -c d.cubin > d.sass
  python3 benchmarks/ncu_source_lines.py X.csv d.sass --kernel 'll_dispatch_kernel<(bool)1' \\
      --sass-kernel 'll_dispatch_kernelILb1ELb0E' --executed 100:140
"""

from __future__ import annotations

import argparse
import collections
import csv
import re


def sass_lines(path: str, kernel: str) -> list[str]:
    """file:line of each instruction of the kernel whose section name contains `kernel`."""
    out, cur, on = [], "?", False
    for line in open(path):
        if line.lstrip().startswith(".text.") and kernel in line:
            on = True
            continue
        if on and line.startswith("//----") and out:
            break
        if not on:
            continue
        m = re.search(r'//## File ".*?([^/"]+)", line (\d+)', line)
        if m:
            cur = f"{m.group(1)}:{m.group(2)}"
        elif re.match(r"\s*/\*[0-9a-f]+\*/\s+\S", line):
            out.append(cur)
    return out


def ncu_launches(path: str, kernel: str) -> tuple[list[str], list[list[dict]]]:
    """(stall column names, per launch of a matching kernel its rows, one per instruction)."""
    hdr, launches, cur = None, [], None
    for row in csv.reader(open(path)):
        if not row:
            continue
        if row[0] == "Kernel Name":
            cur = [] if kernel in row[1] else None
            if cur is not None:
                launches.append(cur)
            hdr = None
        elif row[0] == "Address":
            hdr = row
        elif hdr and cur is not None:
            cur.append(dict(zip(hdr, row)))
    stalls = [h for h in (hdr or []) if h.startswith("stall_") and "Not Issued" not in h]
    return stalls, launches


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("sass")
    ap.add_argument("--kernel", required=True, help="substring of ncu's kernel name")
    ap.add_argument("--sass-kernel", required=True, help="substring of the cubin's section name")
    ap.add_argument("--executed", default="1:1000000", help="LO:HI warp executions per launch")
    ap.add_argument("--min-samples", type=int, default=1)
    a = ap.parse_args()
    lo, hi = map(int, a.executed.split(":"))
    lines = sass_lines(a.sass, a.sass_kernel)
    stalls, launches = ncu_launches(a.csv, a.kernel)
    if not launches or len(launches[0]) != len(lines):
        raise SystemExit(f"{len(launches)} launches; ncu lists {len(launches[0]) if launches else 0} "
                         f"instructions, the cubin {len(lines)}: not the same build")
    per = collections.OrderedDict()
    for i, where in enumerate(lines):
        ex = int(launches[0][i]["Instructions Executed"] or 0)
        if not lo <= ex <= hi:
            continue
        c = per.setdefault(where, collections.Counter())
        c["instructions"] += 1
        for rows in launches:
            c["samples"] += int(rows[i]["# Samples"] or 0)
            for s in stalls:
                c[s[6:]] += int(rows[i][s] or 0)
    total = sum(c["samples"] for c in per.values())
    print(f"{len(launches)} launches, {len(lines)} instructions; {total} samples on instructions "
          f"run {lo}..{hi} warp-times a launch")
    for where, c in per.items():
        if c["samples"] < a.min_samples:
            continue
        top = ", ".join(f"{k} {v}" for k, v in c.most_common()
                        if k not in ("samples", "instructions") and v)[:90]
        print(f"{where:34s} {c['instructions']:5d} instr {c['samples']:5d} samples  {top}")


if __name__ == "__main__":
    main()
