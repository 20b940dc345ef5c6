"""The benchmark's token sweep and its plot (CPU only).

plot_ll.plot on a synthetic results dict, and bench_ll.py --sweep-tokens as a CPU
dry run (reference path, 2 virtual devices) in a subprocess: the JSON holds the
sweep and --plot writes the PNG (or says where to make it without matplotlib).
"""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import _bench_module

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _plot_ll():
    return _bench_module.load("plot_ll")


def _synthetic(tokens):
    """A results dict shaped like bench_ll.py's, with made-up timings."""
    rng = np.random.default_rng()
    systems = {}
    # ours: tens of µs growing slowly with T; the baseline: milliseconds
    for name, base in (("mem-fp8", 10.0), ("mem-bf16", 12.0), ("port-fp8", 11.0), ("ragged-bf16", 300.0)):
        grow = np.asarray(tokens, float) / tokens[-1]
        d = base * (1 + grow) * rng.uniform(0.9, 1.1, len(tokens))
        c = base * (1 + 2 * grow) * rng.uniform(0.9, 1.1, len(tokens))
        systems[name] = {"dispatch_us": [float(v) for v in d], "combine_us": [float(v) for v in c]}
    # a system that failed part-way: lists padded with None, error kept
    systems["mem-bf16"]["combine_us"][-1] = None
    systems["mem-bf16"]["dispatch_us"][-1] = None
    systems["mem-bf16"]["error"] = "RuntimeError: made up"
    return {"devices": ["cuda:0", "cuda:1"], "device_kind": "NVIDIA H200", "jax": "0.0",
            "mem_transport": "channels", "steps": 200, "reps": 5, "shapes": {},
            "sweep": {"shape": {"M": tokens[-1], "H": 7168, "K": 8, "E": 256, "R": 2},
                      "tokens": list(tokens), "steps": 200, "reps": 5, "unroll": 10,
                      "systems": systems}}


def _is_png(path):
    data = pathlib.Path(path).read_bytes()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "sweep.png"
    _plot_ll().plot(_synthetic([1, 2, 4, 8, 16, 32, 64, 128]), str(out))
    assert _is_png(out)


def test_plot_cli(tmp_path):
    pytest.importorskip("matplotlib")
    src, out = tmp_path / "r.json", tmp_path / "cli.png"
    src.write_text(json.dumps(_synthetic([1, 4, 16])))
    p = subprocess.run([sys.executable, str(BENCH / "plot_ll.py"), str(src), str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert _is_png(out)


def test_plot_needs_a_sweep(tmp_path):
    res = _synthetic([1, 2])
    del res["sweep"]
    with pytest.raises(ValueError, match="--sweep-tokens"):
        _plot_ll().plot(res, str(tmp_path / "x.png"))


def test_bench_sweep_dry_run(tmp_path):
    """bench_ll.py --sweep-tokens on CPU: every system gets one entry per T."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    out, png = tmp_path / "ll", tmp_path / "ll.png"
    tokens = [1, 4, 8]
    # ragged-bf16 is in: XLA:CPU has no ragged-all-to-all, so it shows the error path
    systems = ["mem-fp8", "mem-bf16", "port-fp8", "ragged-bf16"]
    cmd = [sys.executable, str(BENCH / "bench_ll.py"), "--platform", "cpu", "--shapes", "8,256,2,8",
           "--sweep-tokens", ",".join(map(str, tokens)), "--sweep-only", "--steps", "3", "--reps", "2",
           "--unroll", "1", "--systems", ",".join(systems), "--out", str(out), "--plot", str(png)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "ll.json").read_text())
    sw = res["sweep"]
    assert sw["tokens"] == tokens
    assert sw["shape"] == {"M": 8, "H": 256, "K": 2, "E": 8, "R": 2}
    assert res["shapes"] == {}  # --sweep-only
    assert list(sw["systems"]) == systems
    for name, row in sw["systems"].items():
        assert len(row["dispatch_us"]) == len(row["combine_us"]) == len(tokens), name
        if name.startswith("ragged") and "error" in row:
            continue
        assert "error" not in row, (name, row.get("error"))
        assert all(v > 0 for v in row["dispatch_us"] + row["combine_us"]), name
    md = (tmp_path / "ll.md").read_text()
    assert "Token sweep: M=8" in md and "| T |" in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert _is_png(png)
    else:
        assert "plot_ll.py" in p.stdout and not png.exists()


def test_bench_ffn_cpu_dry_run(tmp_path):
    """bench_ffn.py on the CPU: every FFN variant timed, results agree, files written."""
    out = tmp_path / "ffn"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, str(BENCH / "bench_ffn.py"), "--shapes", "2,8,128,64,2,8;4,4,128,32,4,16",
           "--reps", "2", "--out", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "ffn.json").read_text())
    assert [(r["R"], r["E"]) for r in res["rows"]] == [(2, 8), (4, 16)]
    for r in res["rows"]:
        for v in ("masked", "bucketed", "ragged"):
            assert r[f"{v}_fwd_us"] > 0 and r[f"{v}_fwd_bwd_us"] > 0, (v, r)
        assert r["max_count"] <= r["bucket"] and r["max_rel_diff"] < 1e-2, r
    assert "fwd masked / bucketed / ragged" in (tmp_path / "ffn.md").read_text()
