"""Test setup: 8 virtual CPU devices, unless a GPU test run asked for the GPUs.

XLA_FLAGS must be set before jax is imported anywhere, hence here.
"""
import os

if os.environ.get("JMEP_TEST_PLATFORM", "cpu") == "cpu":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
