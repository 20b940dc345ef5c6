"""The compiled module, if this install has one (the CPU path works without it)."""

try:
    from . import _ep
except ImportError:  # installed without a compiler, or run from a source tree
    _ep = None


def cuda_enabled() -> bool:
    """True when the native module was built with the CUDA kernels and channels."""
    return _ep is not None and bool(_ep.cuda_enabled())


def native_version():
    return None if _ep is None else _ep.version()
