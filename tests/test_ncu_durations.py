"""benchmarks/ncu_durations.py reads ncu's CSV (CPU only): per (kernel, grid) medians in µs,
whatever unit ncu picked for a row, ncu's own log lines before the table ignored."""
import statistics

import numpy as np

import _bench_module

HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
          '"Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit",'
          '"Metric Value"')


def _mod():
    return _bench_module.load("ncu_durations")


def _row(i, name, grid, unit, value, metric="gpu__time_duration.sum"):
    return (f'"{i}","7","python3","h","{name}","1","14","(512, 1, 1)","({grid}, 1, 1)","0","9.0",'
            f'"Command line profiler metrics","{metric}","{unit}","{value}"')


def test_medians_per_kernel_and_grid():
    rng = np.random.default_rng()
    small = rng.uniform(1.3, 1.6, 9)    # us
    big = rng.uniform(8.0, 11.0, 12)    # us, written by ncu in nanoseconds with a comma
    rows = ["==PROF== Connected to process 7", "==PROF== Profiling \"k\": 0%....100%", HEADER]
    for i, v in enumerate(small):
        rows.append(_row(i, "void k<0>(Args)", 1, "usecond", f"{v:.3f}"))
        rows.append(_row(i, "void k<0>(Args)", 1, "inst", "2.5", metric="smsp__other.ratio"))
    for i, v in enumerate(big):
        rows.append(_row(100 + i, "void k<0>(Args)", 132, "nsecond", f"{v * 1e3:,.0f}"))
    got = _mod().durations("\n".join(rows))
    assert set(got) == {("void k<0>(Args)", "(1, 1, 1)"), ("void k<0>(Args)", "(132, 1, 1)")}
    np.testing.assert_allclose(got[("void k<0>(Args)", "(1, 1, 1)")], np.round(small, 3))
    b = got[("void k<0>(Args)", "(132, 1, 1)")]
    assert len(b) == len(big)
    assert abs(statistics.median(b) - statistics.median(big)) < 1e-3


def test_no_table_is_empty():
    assert not _mod().durations("==PROF== nothing profiled\n")
