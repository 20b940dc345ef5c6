"""Test setup: 8 virtual CPU devices for the CPU tests, GPUs left alone.

XLA_FLAGS must be set before jax is imported anywhere, hence here. Tests not
marked `gpu` run with the CPU as default device, so on a GPU machine they
still exercise the CPU (reference) lowering; GPU tests pick their devices
explicitly.
"""
import os

import pytest

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()


@pytest.fixture(autouse=True)
def _cpu_default_device(request):
    if request.node.get_closest_marker("gpu") is not None:
        yield
        return
    import jax

    with jax.default_device(jax.devices("cpu")[0]):
        yield
