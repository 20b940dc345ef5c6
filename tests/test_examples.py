"""Each example runs (CPU, small sizes) in a subprocess and prints its success line."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = {
    "quickstart": (["--tokens", "8", "--hidden", "128"], "OK: quickstart"),
    "train_moe": (["--steps", "40"], "OK: EP training matches non-EP training"),
    "decode_loop": (["--steps", "4", "--slots", "8", "--hidden", "128"],
                    "OK: decode loop matches the dense model"),
    "decode_survive": (["--steps", "4"], "OK: decode loop kept serving after losing a rank"),
    "decode_survive_kill": (["--nprocs", "2", "--steps", "6", "--lose-at", "2"],
                            "OK: the survivors kept serving after losing rank 1"),
    "launch_multiprocess": (["--nprocs", "2", "--tokens", "8", "--hidden", "128"],
                            "OK: all 2 processes passed"),
    "route_tokens": (["--tokens", "16", "--hidden", "128"], "OK: expert-parallel MoE output"),
    "flax_moe": (["--steps", "20"], "OK: Flax EP module matches the dense module"),
}
NEEDS = {"flax_moe": ("flax", "optax")}   # in the test extra; absent on the GPU image


@pytest.mark.parametrize("name", sorted(CASES))
def test_example(name):
    args, success = CASES[name]
    for mod in NEEDS.get(name, ()):
        pytest.importorskip(mod)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)   # each example sets up its own (virtual) devices
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name + ".py"), *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and success in proc.stdout, f"{name} failed:\n{out[-4000:]}"


def test_launch_multiprocess_simulated_hosts():
    """--ranks-per-host: each process gets its own JMEP_HOST_ID (on CPU the reference path
    runs; on GPUs the peers of other simulated hosts are reached over UCX)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "launch_multiprocess.py"),
                           "--nprocs", "2", "--ranks-per-host", "1", "--tokens", "8",
                           "--hidden", "128"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "OK: all 2 processes passed" in proc.stdout, out[-4000:]


def test_train_moe_plot_without_a_path(tmp_path):
    """--plot alone writes results/train_loss_cpu.png beside the script (run from a copy,
    so the committed plot is left alone)."""
    pytest.importorskip("matplotlib")
    script = tmp_path / "train_moe.py"
    script.write_text(open(os.path.join(ROOT, "examples", "train_moe.py")).read())
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(script), "--steps", "20", "--plot"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    png = tmp_path / "results" / "train_loss_cpu.png"
    assert proc.returncode == 0 and png.is_file() and png.stat().st_size > 1000, \
        (proc.stdout + proc.stderr)[-4000:]
