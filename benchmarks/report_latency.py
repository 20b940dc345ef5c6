"""Issue 14's latency table and plot: runs of bench_latency.py beside the DeepEP anchor.

  python benchmarks/report_latency.py before.json after.json \
      --anchor ../shared/anchors/deepep_v1_ll_h200x1.json --out benchmarks/results/ll_latency_h200x1

Writes OUT.md, OUT.json (runs + anchor) and OUT.png (with matplotlib). The last run is
the one the goals are checked on: T = 1 dispatch <= 6 us and combine <= 5 us; T = 128
dispatch fp8 <= 12, bf16 <= 15, combine <= 13; at every T 1.3x ahead of DeepEP.
"""

from __future__ import annotations

import argparse
import importlib.util
import json

KEYS = ("dispatch_fp8_us", "dispatch_bf16_us", "combine_after_fp8_us")
GOALS = {1: {"dispatch_fp8_us": 6, "dispatch_bf16_us": 6, "combine_after_fp8_us": 5},
         128: {"dispatch_fp8_us": 12, "dispatch_bf16_us": 15, "combine_after_fp8_us": 13}}
AHEAD = 1.3


def by_t(run):
    return {row["T"]: row for row in run["sweep"]}


def goal_lines(anchor, last):
    lines, a, b = [], by_t(anchor), by_t(last)
    for t, goals in GOALS.items():
        for key, limit in goals.items():
            v = b.get(t, {}).get(key)
            ok = v is not None and v <= limit
            lines.append(f"- T = {t} {key[:-3]}: {v} us (goal <= {limit}): {'met' if ok else 'NOT met'}")
    for t in sorted(b):
        for key in KEYS:
            v, ref = b[t].get(key), a.get(t, {}).get(key)
            if v and ref and ref / v < AHEAD:
                lines.append(f"- T = {t} {key[:-3]}: DeepEP {ref} / ours {v} = {ref / v:.2f}x "
                             f"(goal >= {AHEAD}x): NOT met")
    return lines


def table(anchor, runs):
    cols = [("DeepEP", anchor)] + [(r["label"], r) for r in runs]
    head = "| T | " + " | ".join(f"{n} {k[:-3].replace('_', ' ')}" for n, _ in cols for k in KEYS)
    lines = [head + " | DeepEP / last (fp8, bf16, combine) |",
             "|---|" + "---|" * (len(cols) * len(KEYS) + 1)]
    rows = [by_t(r) for _, r in cols]
    for t in sorted(rows[-1]):
        cells = [f"{rows[i].get(t, {}).get(k, '–')}" for i in range(len(cols)) for k in KEYS]
        ratios = []
        for k in KEYS:
            ref, v = rows[0].get(t, {}).get(k), rows[-1][t].get(k)
            ratios.append(f"{ref / v:.2f}x" if ref and v else "–")
        lines.append(f"| {t} | " + " | ".join(cells) + " | " + ", ".join(ratios) + " |")
    return lines


def plot(anchor, runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(KEYS), figsize=(5 * len(KEYS), 4), sharey=True)
    for ax, key in zip(axes, KEYS):
        for name, run, style in [("DeepEP v1", anchor, "k--")] + [(r["label"], r, "-o") for r in runs]:
            rows = sorted(run["sweep"], key=lambda row: row["T"])
            ax.plot([row["T"] for row in rows], [row.get(key) for row in rows], style, label=name)
        ax.set_xscale("log", base=2)
        ax.set_title(key[:-3].replace("_", " "))
        ax.set_xlabel("tokens per rank")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("kernel duration (us, CUDA profiler median)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="bench_latency.py JSON files, oldest first")
    ap.add_argument("--anchor", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--note", default="", help="a paragraph put under the title (e.g. what the runs are)")
    a = ap.parse_args()
    runs = [json.load(open(p)) for p in a.runs]
    for run in runs:  # per-launch durations stay in the raw run files
        run["sweep"] = [{k: v for k, v in row.items() if not k.endswith("_raw_us")} for row in run["sweep"]]
    anchor = json.load(open(a.anchor))
    last = runs[-1]
    sh = last["shape"]
    md = [f"# LL latency vs tokens per rank on 1x {last['device_kind']} (jax {last['jax']}), R = 1",
          "", f"Shape M={sh['M']} H={sh['H']} K={sh['K']} E={sh['E']}; {last['metric']}; "
          f"{last['steps']} steps per (T, dtype). DeepEP: {anchor['what']} ({anchor['metric']}).",
          *(["", a.note] if a.note else []), "", *table(anchor, runs), "", "Goals (issue 14), on the last run:", *goal_lines(anchor, last)]
    gl = ["", "The kernels' own %globaltimer means (us), last run:", "",
          "| T | dispatch fp8 | dispatch bf16 | combine |", "|---|---|---|---|"]
    for row in sorted(last["sweep"], key=lambda r: r["T"]):
        gl.append(f"| {row['T']} | {row.get('dispatch_fp8_globaltimer_us')} | "
                  f"{row.get('dispatch_bf16_globaltimer_us')} | {row.get('combine_after_fp8_globaltimer_us')} |")
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(md + gl) + "\n")
    with open(a.out + ".json", "w") as f:
        json.dump({"anchor": anchor, "runs": runs}, f, indent=1)
    if importlib.util.find_spec("matplotlib") is not None:
        plot(anchor, runs, a.out + ".png")
    print("\n".join(md))


if __name__ == "__main__":
    main()
