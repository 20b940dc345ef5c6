"""The kernels' division by a registration-time divisor (ffi/kernels/ll_divisor.h).

The LL kernels divide by the rank count and the local expert count with a
multiply-high and a shift; a wrong magic number would send rows to the wrong
(expert, rank). The host build of the same code is checked here against Python's
// and % for every divisor the limits allow.
"""

import numpy as np
import pytest

import jax_mscclpp_ep as ep
from jax_mscclpp_ep import native


def _ext():
    if not ep.cuda_enabled() or not hasattr(native.ext, "ll_divide"):
        pytest.skip("no CUDA build with the LL kernels")
    return native.ext


def test_every_divisor_on_small_and_random_numerators():
    ext = _ext()
    rng = np.random.default_rng()
    small = np.arange(0, 2048)
    for d in range(1, 1025):  # MAX_EXPERTS: local experts and ranks are at most this
        wide = rng.integers(0, 2**31, size=256)
        edges = [2**31 - 1, 2**31 - 2, d * (2**31 // d) - 1]
        ns = np.concatenate([small, wide, edges]).astype(np.int64)
        q, r = ext.ll_divide(d, ns.tolist())
        np.testing.assert_array_equal(np.asarray(q), ns // d, err_msg=f"d={d}")
        np.testing.assert_array_equal(np.asarray(r), ns % d, err_msg=f"d={d}")


def test_large_divisors():
    ext = _ext()
    rng = np.random.default_rng()
    for d in [int(v) for v in rng.integers(1025, 2**31, size=64)] + [2**30, 2**31 - 1]:
        ns = rng.integers(0, 2**31, size=512).astype(np.int64)
        q, r = ext.ll_divide(d, ns.tolist())
        np.testing.assert_array_equal(np.asarray(q), ns // d, err_msg=f"d={d}")
        np.testing.assert_array_equal(np.asarray(r), ns % d, err_msg=f"d={d}")
