"""The UCX connection library (``libjmep_ucx.so``): finding it, loading UCX, and a
ctypes face of its C API (``ffi/ucx/jmep_ucx.h``).

The port-channel proxy reaches peers on other hosts through this library; the
main module never links UCX, so a single-host job never loads it. Loading goes
in two steps: UCX itself (the ``libucx-cu13`` wheel's ``libucx.load_library()``,
else a system UCX on the loader path, e.g. HPC-X/MOFED), then our library.

``UcxEndpoint`` drives the library on host memory; the tests use it to check the
connection between processes without a GPU.
"""
from __future__ import annotations

import ctypes
import os

from . import env

LIB_NAME = "libjmep_ucx.so"
INSTALL_HINT = ("install UCX for jax_mscclpp_ep: `pip install jax_mscclpp_ep[ucx]` (the "
                "libucx-cu13 wheel: TCP, shared memory, CUDA transports) or put a system UCX "
                "built with verbs (HPC-X, MOFED) on the loader path for InfiniBand/RoCE, and "
                "build jax_mscclpp_ep where CMake finds UCX")

MEM_HOST, MEM_CUDA = 0, 1
SIGNALS_RMA, SIGNALS_AM = 0, 1
SIGNAL_MODES = {"rma": SIGNALS_RMA, "am": SIGNALS_AM}

_lib = None
_load_error = None


class UcxUnavailableError(RuntimeError):
    """UCX or the UCX connection library cannot be loaded here."""


def library_path() -> str:
    """JMEP_UCX_LIBRARY if set, else the library installed next to this module."""
    return (env.ucx_library()
            or os.path.join(os.path.dirname(os.path.abspath(__file__)), LIB_NAME))


def _load_ucx() -> None:
    try:
        import libucx  # the PyPI wheel: puts its libucs/libuct/libucp in the loader's cache
    except ImportError:
        return  # a system UCX must then be on the loader path
    libucx.load_library()


def _declare(lib) -> None:
    c = ctypes
    vp, u64, i64 = c.c_void_p, c.c_uint64, c.c_int64
    sig = {
        "jmep_ucx_version": (c.c_char_p, []),
        "jmep_ucx_create": (vp, [c.c_int, c.c_int, vp, u64, c.c_int, c.c_int, i64, vp, vp,
                                 c.c_char_p, u64]),
        "jmep_ucx_address": (i64, [vp, vp, u64]),
        "jmep_ucx_connect": (c.c_int, [vp, c.c_int, c.c_char_p, u64]),
        "jmep_ucx_put": (c.c_int, [vp, c.c_int, u64, u64, u64]),
        "jmep_ucx_add": (c.c_int, [vp, c.c_int, u64, i64]),
        "jmep_ucx_store": (c.c_int, [vp, c.c_int, u64, u64]),
        "jmep_ucx_flush": (c.c_int, [vp, c.c_int]),
        "jmep_ucx_progress": (c.c_int, [vp]),
        "jmep_ucx_outstanding": (i64, [vp]),
        "jmep_ucx_last_error": (c.c_char_p, [vp]),
        "jmep_ucx_failed_peer": (c.c_int, [vp]),
        "jmep_ucx_set_peer_isolation": (c.c_int, [vp, c.c_int]),
        "jmep_ucx_describe": (i64, [vp, c.c_int, c.c_char_p, u64]),
        "jmep_ucx_destroy": (None, [vp]),
    }
    for name, (res, args) in sig.items():
        f = getattr(lib, name)
        f.restype, f.argtypes = res, args


def load():
    """The loaded library (ctypes.CDLL); raises UcxUnavailableError saying what to install."""
    global _lib, _load_error
    if _lib is not None:
        return _lib
    if _load_error is not None:
        raise UcxUnavailableError(_load_error)
    path = library_path()
    try:
        if not os.path.exists(path):
            raise OSError(f"{path} is not installed (this build found no UCX headers)")
        _load_ucx()
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
        _declare(lib)
    except OSError as e:
        _load_error = f"jax_mscclpp_ep: the UCX connection is unavailable ({e}); {INSTALL_HINT}"
        raise UcxUnavailableError(_load_error) from None
    _lib = lib
    return lib


def available() -> bool:
    try:
        load()
        return True
    except UcxUnavailableError:
        return False


def version() -> str:
    return load().jmep_ucx_version().decode()


class UcxError(RuntimeError):
    pass


class UcxEndpoint:
    """One rank's UCX connection over a host-memory region (tests, benchmarks).

    base: address of the region (e.g. ``arr.ctypes.data``); the caller keeps it alive.
    signal_mode: "rma" (UCX atomics / puts on our memory) or "am" (active messages
    applied by the receiving worker).
    """

    def __init__(self, rank: int, nranks: int, base: int, nbytes: int, *, signal_mode="rma",
                 timeout_s: float = 10.0):
        self._lib = load()
        err = ctypes.create_string_buffer(512)
        h = self._lib.jmep_ucx_create(rank, nranks, ctypes.c_void_p(base), nbytes, MEM_HOST,
                                      SIGNAL_MODES[signal_mode], int(timeout_s * 1e9), None,
                                      None, err, len(err))
        if not h:
            raise UcxError(err.value.decode(errors="replace"))
        self._h = ctypes.c_void_p(h)
        self.rank, self.nranks = rank, nranks

    def _ck(self, rc):
        if rc != 0:
            raise UcxError(self.last_error())

    def address(self) -> bytes:
        n = self._lib.jmep_ucx_address(self._h, None, 0)
        buf = ctypes.create_string_buffer(-n)
        m = self._lib.jmep_ucx_address(self._h, buf, len(buf))
        if m < 0:
            raise UcxError("address did not fit")
        return buf.raw[:m]

    def connect(self, peer: int, blob: bytes) -> None:
        self._ck(self._lib.jmep_ucx_connect(self._h, peer, blob, len(blob)))

    def put(self, peer: int, dst_off: int, src_off: int, nbytes: int) -> None:
        self._ck(self._lib.jmep_ucx_put(self._h, peer, dst_off, src_off, nbytes))

    def add(self, peer: int, dst_off: int, delta: int) -> None:
        self._ck(self._lib.jmep_ucx_add(self._h, peer, dst_off, delta))

    def store(self, peer: int, dst_off: int, value: int) -> None:
        self._ck(self._lib.jmep_ucx_store(self._h, peer, dst_off, value))

    def flush(self, peer: int = -1) -> None:
        self._ck(self._lib.jmep_ucx_flush(self._h, peer))

    def progress(self) -> int:
        n = self._lib.jmep_ucx_progress(self._h)
        if n < 0:
            raise UcxError(self.last_error())
        return n

    def outstanding(self) -> int:
        return int(self._lib.jmep_ucx_outstanding(self._h))

    def last_error(self) -> str:
        return self._lib.jmep_ucx_last_error(self._h).decode(errors="replace")

    def failed_peer(self) -> int:
        return int(self._lib.jmep_ucx_failed_peer(self._h))

    def set_peer_isolation(self, on: bool) -> None:
        """A failing peer loses only itself (jmep_ucx_set_peer_isolation)."""
        self._ck(self._lib.jmep_ucx_set_peer_isolation(self._h, int(bool(on))))

    def describe(self, peer: int) -> str:
        buf = ctypes.create_string_buffer(8192)
        n = self._lib.jmep_ucx_describe(self._h, peer, buf, len(buf))
        return "" if n < 0 else buf.value.decode(errors="replace")

    def close(self) -> None:
        if self._h is not None:
            self._lib.jmep_ucx_destroy(self._h)
            self._h = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
