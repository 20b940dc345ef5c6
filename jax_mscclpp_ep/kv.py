"""JAX's distributed key-value store: how the processes of a job swap bytes and meet.

Only multi-process jobs use it (after ``jax.distributed.initialize``); a
single-process job has nothing to swap.
"""

from __future__ import annotations

import jax


def client():
    """JAX's distributed KV client, or a clear error if the job has none."""
    try:
        from jax._src import distributed
        c = distributed.global_state.client
    except Exception:  # pragma: no cover - jax internals moved
        c = None
    if c is None:
        raise RuntimeError(
            "jax_mscclpp_ep: this is a multi-process job but jax.distributed is not "
            "initialised; call jax.distributed.initialize(...) before creating a Buffer")
    return c


def put(c, key: str, value: bytes) -> None:
    if hasattr(c, "key_value_set_bytes"):
        c.key_value_set_bytes(key, value)
    else:  # older clients: hex in a string
        c.key_value_set(key, value.hex())


def get(c, key: str, timeout_ms: int) -> bytes:
    """The value under key, waiting up to timeout_ms for some process to put it."""
    if hasattr(c, "blocking_key_value_get_bytes"):
        return bytes(c.blocking_key_value_get_bytes(key, timeout_ms))
    return bytes.fromhex(c.blocking_key_value_get(key, timeout_ms))


def barrier(name: str, timeout_s: float) -> None:
    """Every process of the job reaches this point (no-op in a single process).
    ``name`` must be new for each use and the same on every process."""
    n = jax.process_count()
    if n == 1:
        return
    c, ms = client(), int(timeout_s * 1000)
    put(c, f"{name}/{jax.process_index()}", b"1")
    for p in range(n):
        get(c, f"{name}/{p}", ms)
