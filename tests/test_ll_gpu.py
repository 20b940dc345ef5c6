"""LL dispatch/combine kernels on real GPUs against the pure-JAX reference, reported
case by case: every case of tests/multiprocess/ in every configuration of
tests/ll_configs.py (one process for every GPU or one per rank, ranks sharing GPU 0,
memory and forced port channels, simulated hosts over UCX, dead peer, lifecycle,
long runs, CUDA graphs). Each configuration's processes start once, for the cases
selected here (-k works on "configuration/case"); a failing item shows the failing
rank's message, a hang or crash names the case it happened in. Logs: JMEP_LL_LOG_DIR
(else a temporary folder); group limit: JMEP_LL_TEST_TIMEOUT seconds (900)."""

import pytest

import jax_mscclpp_ep as ep
import ll_configs
from mp_parent import GroupRuns, case_params, exit_params

CONFIGS = ll_configs.gpu_configs()


@pytest.fixture(scope="module")
def groups(request):
    return GroupRuns(CONFIGS, request.session)


@pytest.mark.parametrize("config,case", case_params(CONFIGS, marks=[pytest.mark.gpu]))
def test_ll(groups, config, case):
    groups.check_case(config, case)


@pytest.mark.parametrize("config", exit_params(CONFIGS, marks=[pytest.mark.gpu]))
def test_ll_exit(groups, config):
    """Every rank of the configuration exited 0 (and, for the exit-without-close
    configurations, without a traceback or warning: Buffers released quietly)."""
    groups.check_exit(config)


def test_ll_size_hint_matches_config():
    if not ll_configs.ll_built():
        pytest.skip("no CUDA LL build")
    from jax_mscclpp_ep import native
    for (m, h, r, e) in [(128, 7168, 2, 256), (1, 128, 1, 1), (1024, 8192, 8, 1024), (37, 5120, 4, 64)]:
        assert native.ext.ll_size_hint(m, h, r, e) == ep.size_hint(m, h, r, e)
