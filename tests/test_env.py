"""The environment variables, each parsed in one place (jax_mscclpp_ep/env.py)."""

import pytest

from jax_mscclpp_ep import config, env


@pytest.mark.parametrize("value,want", [(None, False), ("", False), ("0", False), ("false", False),
                                        ("No", False), ("OFF", False), ("1", True), ("yes", True),
                                        ("true", True)])
def test_force_port_flag(monkeypatch, value, want):
    if value is None:
        monkeypatch.delenv("JMEP_FORCE_PORT_CHANNELS", raising=False)
    else:
        monkeypatch.setenv("JMEP_FORCE_PORT_CHANNELS", value)
    assert env.force_port() is want


def test_timeout(monkeypatch):
    monkeypatch.delenv("JMEP_TIMEOUT_S", raising=False)
    assert env.timeout_s() == config.DEFAULT_TIMEOUT_S
    monkeypatch.setenv("JMEP_TIMEOUT_S", " 2.5 ")
    assert env.timeout_s() == 2.5


def test_strings(monkeypatch):
    monkeypatch.setenv("JMEP_HOST_ID", " node-7 ")
    monkeypatch.setenv("JMEP_UCX_SIGNALS", " RMA ")
    assert env.host_id() == "node-7" and env.ucx_signals() == "rma"
    monkeypatch.delenv("JMEP_UCX_SIGNALS")
    assert env.ucx_signals() == "am"
