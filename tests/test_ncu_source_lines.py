"""benchmarks/ncu_source_lines.py (CPU only): ncu's per-instruction samples summed per source
line of a -lineinfo disassembly, over the launches, for the instructions in an execution
range; a disassembly of another build (another instruction count) is refused."""
import subprocess
import sys

import numpy as np

import _bench_module

BENCH = _bench_module.BENCH
COLS = ["Address", "Source", "# Samples", "Instructions Executed", "stall_barrier", "stall_wait"]


def _mod():
    return _bench_module.load("ncu_source_lines")


def _sass(lines):
    """nvdisasm -g style text: a kernel section, file/line markers, one instruction each."""
    out = ["//--------------------- .text.other --------------------------",
           "\t.section\t.text._Z5otherv,\"ax\",@progbits", "        /*0000*/   NOP ;",
           "//--------------------- .text._Z4kernv --------------------------",
           "\t.section\t.text._Z4kernv,\"ax\",@progbits", ".text._Z4kernv:"]
    for i, where in enumerate(lines):
        f, n = where.split(":")
        out.append(f'\t//## File "/src/{f}", line {n}')
        out.append(f"        /*{16 * i:04x}*/                   IADD3 R1, R1, 0x1, RZ ;")
    return "\n".join(out + ["//--------------------- .nv.info --------------------------"])


def _csv(launches, ex):
    rows = ['==PROF== Connected to process 1']
    for samples, barrier in launches:
        rows.append('"Kernel Name","void kern(Args)",')
        rows.append(",".join(f'"{c}"' for c in COLS))
        for i, (n, b) in enumerate(zip(samples, barrier)):
            rows.append(",".join(f'"{v}"' for v in (f"0x{i:x}", "IADD3", n, ex[i], b, n - b)))
    return "\n".join(rows) + "\n"


def test_samples_per_line_over_launches(tmp_path):
    rng = np.random.default_rng()
    lines = ["a.cu:10", "a.cu:10", "b.cuh:3", "a.cu:11", "b.cuh:3"]
    ex = [128, 128, 2112, 130, 128]  # instruction 2 runs on every warp: outside the range
    launches = []
    for _ in range(3):
        s = rng.integers(1, 50, len(lines))
        launches.append((s, rng.integers(0, s + 1)))
    (tmp_path / "x.csv").write_text(_csv(launches, ex))
    (tmp_path / "x.sass").write_text(_sass(lines))
    mod = _mod()
    assert mod.sass_lines(str(tmp_path / "x.sass"), "_Z4kernv") == lines
    out = subprocess.run([sys.executable, str(BENCH / "ncu_source_lines.py"), str(tmp_path / "x.csv"),
                          str(tmp_path / "x.sass"), "--kernel", "kern", "--sass-kernel", "_Z4kernv",
                          "--executed", "100:140"], capture_output=True, text=True, check=True).stdout
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines()[1:]}
    tot = lambda idx: int(sum(launches[j][0][i] for j in range(3) for i in idx))  # noqa: E731
    assert rows["a.cu:10"][1] == "2" and int(rows["a.cu:10"][3]) == tot([0, 1])
    assert int(rows["a.cu:11"][3]) == tot([3])
    assert rows["b.cuh:3"][1] == "1" and int(rows["b.cuh:3"][3]) == tot([4])
    barrier = int(sum(launches[j][1][i] for j in range(3) for i in (0, 1)))
    assert f"barrier {barrier}" in " ".join(rows["a.cu:10"]) or barrier == 0
    assert out.splitlines()[0].startswith("3 launches, 5 instructions")


def test_another_build_is_refused(tmp_path):
    (tmp_path / "x.csv").write_text(_csv([(np.array([3, 4]), np.array([1, 1]))], [128, 128]))
    (tmp_path / "x.sass").write_text(_sass(["a.cu:1", "a.cu:2", "a.cu:3"]))
    r = subprocess.run([sys.executable, str(BENCH / "ncu_source_lines.py"), str(tmp_path / "x.csv"),
                        str(tmp_path / "x.sass"), "--kernel", "kern", "--sass-kernel", "_Z4kernv"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "not the same build" in r.stderr
