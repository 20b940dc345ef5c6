"""Rank side: tests/ on the path (the shared helpers, _ep_util and mp_env), the group
fixture, and a per-case RNG that every rank of the group draws alike."""

import os
import sys
import zlib

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ll_group import EPGroup  # noqa: E402


@pytest.fixture(scope="session")
def group():
    g = EPGroup.start()
    yield g
    g.finish()


@pytest.fixture
def rng(request, group):
    """Fresh every run (the launcher draws the group's seed), the same on every rank, and
    one stream per case, so a case's data does not depend on which cases ran before."""
    print(f"{group.tag} seed {group.settings.seed} case {request.node.nodeid}", flush=True)
    return np.random.default_rng([group.settings.seed, zlib.crc32(request.node.nodeid.encode())])
