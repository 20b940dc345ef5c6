"""Plot the token sweep of bench_ll.py: latency vs tokens per rank, dispatch and combine.

  python benchmarks/plot_ll.py benchmarks/results/ll_sweep.json ll_sweep.png

Reads the "sweep" entry of a results JSON (bench_ll.py --sweep-tokens) and draws two
panels, x = tokens per rank (log2), y = µs per step (log), one line per system. Needs
only matplotlib (Agg backend, no display), not JAX or a GPU, so it runs anywhere the
JSON can be copied to.
"""

from __future__ import annotations

import argparse
import json
import sys

MARKERS = "osD^vP*X"


def _pyplot():
    try:
        import matplotlib
    except ImportError as ex:
        raise ImportError("plot_ll needs matplotlib, which is not installed: pip install matplotlib, "
                          "or plot on a machine that has it (copy the results JSON there)") from ex
    matplotlib.use("Agg")  # files only: no display on the GPU hosts
    import matplotlib.pyplot as plt
    return plt


def _title(results: dict, sw: dict) -> str:
    s = sw["shape"]
    ranks = s.get("R", len(results.get("devices", [])))
    gpu = results.get("device_kind", "?")
    line1 = (f"LL dispatch / combine vs tokens per rank: {ranks}x {gpu}, "
             f"M={s['M']} H={s['H']} K={s['K']} E={s['E']}")
    line2 = (f"per step inside one jitted fori_loop of {sw.get('steps', results.get('steps'))} steps, "
             f"median of {sw.get('reps', results.get('reps'))} loops; buffers sized for M; "
             f"jax {results.get('jax', '?')}, mem transport {results.get('mem_transport', '?')}")
    return line1 + "\n" + line2


def plot(results: dict, png_path: str) -> None:
    """Write the two-panel sweep plot of a bench_ll.py results dict to png_path."""
    sw = results.get("sweep")
    if not sw or not sw.get("tokens"):
        raise ValueError("the results have no token sweep: run bench_ll.py with --sweep-tokens")
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 20, 50, 100 rather than 10^2

    tokens = list(sw["tokens"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    missing = []
    for ax, key, label in zip(axes, ("dispatch_us", "combine_us"), ("dispatch", "combine")):
        drawn, values = 0, []
        for i, (name, row) in enumerate(sw["systems"].items()):
            pts = [(t, v) for t, v in zip(tokens, row.get(key, [])) if v is not None and v > 0]
            if key == "dispatch_us" and (len(pts) < len(tokens) or "error" in row):
                # a failed system keeps what it measured; say why the rest is missing
                missing.append(name + (f" ({row['error'][:80]})" if "error" in row else ""))
            if not pts:
                continue
            ts, vs = zip(*pts)
            # same colour/marker for a system in both panels; the baseline dashed
            ax.plot(ts, vs, color=f"C{i}", marker=MARKERS[i % len(MARKERS)], markersize=5,
                    linestyle="--" if name.startswith("ragged") else "-", label=name)
            drawn += 1
            values += vs
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(tokens)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(plain)
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(plain)
        # a narrow range may hold no 1/2/5 tick: then label the minor ticks as well
        narrow = bool(values) and max(values) / min(values) < 5
        ax.yaxis.set_minor_formatter(plain if narrow else NullFormatter())
        ax.set_xlabel("tokens per rank (T)")
        ax.set_ylabel("µs per step")
        ax.set_title(label)
        ax.grid(True, which="major", alpha=0.4)
        ax.grid(True, which="minor", axis="y", alpha=0.15)
        if drawn:
            ax.legend(fontsize=9)
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")
    fig.suptitle(_title(results, sw), fontsize=10)
    if missing:
        fig.text(0.01, 0.01, "missing points: " + "; ".join(missing), fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.04 if missing else 0, 1, 1))
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", help="results JSON written by bench_ll.py (--out X writes X.json)")
    ap.add_argument("png", help="PNG to write")
    a = ap.parse_args(argv)
    with open(a.results) as f:
        results = json.load(f)
    try:
        plot(results, a.png)
    except (ImportError, ValueError) as ex:
        print(f"error: {ex}", file=sys.stderr)
        return 1
    print(f"wrote {a.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
