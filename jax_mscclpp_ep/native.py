"""The compiled module, if this install has one (the CPU path works without it)."""

from __future__ import annotations

import os
import warnings
from typing import Optional

from . import env

try:
    from . import _ep as ext  # the nanobind module (ffi/)
except ImportError:  # installed without a compiler, or run from a source tree
    ext = None

_PKG = os.path.dirname(os.path.abspath(__file__))


def cuda_enabled() -> bool:
    """True when the native module was built with the CUDA kernels and channels."""
    return ext is not None and bool(ext.cuda_enabled())


def native_version():
    return None if ext is None else ext.version()


def source_tree_hint() -> Optional[str]:
    """What to tell a user whose import found the repository's source tree (ffi/ beside
    the package, no compiled module) instead of the installed package; else None."""
    if ext is not None or not os.path.isfile(os.path.join(os.path.dirname(_PKG), "ffi",
                                                          "CMakeLists.txt")):
        return None
    return (f"jax_mscclpp_ep: you are importing the source tree at {_PKG}, which has no compiled "
            "module (CPU reference only, no CUDA kernels): install with `pip install .` and run "
            "from another directory (e.g. `pytest` rather than `python -m pytest` in the repository)")


def installed_elsewhere() -> bool:
    """An installed jax_mscclpp_ep that this import shadows (the usual cause: cwd = repo root)."""
    from importlib import metadata
    try:
        dist = metadata.distribution("jax_mscclpp_ep")
    except metadata.PackageNotFoundError:
        return False
    where = os.path.abspath(str(dist.locate_file("jax_mscclpp_ep")))
    return where != _PKG


def no_cuda_message() -> str:
    """Why GPU Buffers cannot be made with this import, and how to fix it."""
    hint = source_tree_hint()
    if hint:
        return hint
    if ext is None:
        return ("jax_mscclpp_ep was installed without its compiled module: reinstall with nvcc on "
                "the PATH (JMEP_CUDA=ON makes a missing nvcc an error)")
    return ("jax_mscclpp_ep was built without its CUDA part (nvcc not found at build time): "
            "reinstall with JMEP_CUDA=ON pip install .")


# Expected CUDA (CI, or an installed copy this import shadows) but got the bare source tree.
if source_tree_hint() and (env.expect_cuda() or installed_elsewhere()):
    warnings.warn(source_tree_hint(), RuntimeWarning, stacklevel=2)
