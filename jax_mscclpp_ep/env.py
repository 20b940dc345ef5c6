"""The environment variables the library reads, each parsed in one place.

Explicit arguments (``Buffer(force_port=, timeout_s=, host_id=)``) win over these.
"""

from __future__ import annotations

import os

from .config import DEFAULT_TIMEOUT_S

_FALSE = ("", "0", "false", "no", "off")


def flag(name: str) -> bool:
    """A boolean variable: unset, "", 0, false, no, off (any case) are False."""
    return os.environ.get(name, "").strip().lower() not in _FALSE


def force_port() -> bool:
    """JMEP_FORCE_PORT_CHANNELS: reach every peer through port channels (host proxy)."""
    return flag("JMEP_FORCE_PORT_CHANNELS")


def p2p() -> bool:
    """JMEP_LL_P2P: one process drives the whole group through CUDA peer access,
    without communicators (a debugging aid)."""
    return flag("JMEP_LL_P2P")


def timeout_s() -> float:
    """JMEP_TIMEOUT_S: how long a device-side wait may last (seconds)."""
    v = os.environ.get("JMEP_TIMEOUT_S", "").strip()
    return float(v) if v else DEFAULT_TIMEOUT_S


def host_id() -> str:
    """JMEP_HOST_ID, or "" when unset."""
    return os.environ.get("JMEP_HOST_ID", "").strip()


def ucx_signals() -> str:
    """JMEP_UCX_SIGNALS, lower case ("am" when unset)."""
    return os.environ.get("JMEP_UCX_SIGNALS", "am").strip().lower() or "am"


def ucx_library() -> str:
    """JMEP_UCX_LIBRARY, or "" when unset."""
    return os.environ.get("JMEP_UCX_LIBRARY", "").strip()


def expect_cuda() -> bool:
    """JMEP_EXPECT_CUDA=1 (CI): a missing compiled module is worth a warning."""
    return os.environ.get("JMEP_EXPECT_CUDA") == "1"
