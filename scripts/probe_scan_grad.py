"""Diagnose gradients through a lax.scan of MoE layers on one Buffer (one GPU, R = 1).

Prints, per gradient leaf, the norm relative error against the dense model, for the
code as it is; run it under several XLA_FLAGS (scripts/gpu_scan_probe.sh does) to see
which XLA feature the result depends on.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import _ep_util as u  # noqa: E402
import _layers  # noqa: E402

import jax_mscclpp_ep as ep  # noqa: E402

L, H, F, E, K = 3, 128, 64, 8, 8


def main():
    scan = os.environ.get("JMEP_PROBE_SCAN", "1") == "1"
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("ep",))
    rng, seed = u.fresh_rng()
    n = 32
    layers = _layers.init_layers(jax.random.key(int(rng.integers(1 << 31))), L, H, F, E)
    x = jnp.asarray(rng.standard_normal((n, H)), jnp.bfloat16)
    c = jnp.asarray(rng.standard_normal((n, H)), jnp.float32)
    with ep.Buffer(ep.EPConfig(E, n, H), mesh=mesh, axis_name="ep") as buf:
        f_ep = _layers.ep_model(mesh, buf, scan=scan, top_k=K)
        arg = _layers.stack(layers) if scan else layers
        g_ep = jax.jit(jax.grad(lambda p, xx: jnp.sum(c * f_ep(p, xx).astype(jnp.float32)),
                                argnums=(0, 1)))(arg, x)
        g_d = jax.jit(jax.grad(lambda p, xx: jnp.sum(c * _layers.dense_model(p, xx, top_k=K)
                                                      .astype(jnp.float32)), argnums=(0, 1)))(layers, x)
        if scan:
            g_d = (_layers.stack(g_d[0]), g_d[1])
        worst = 0.0
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_ep), jax.tree.leaves(g_d)):
            e = u.norm_rel_err(a, b)
            worst = max(worst, e)
            print(f"  {jax.tree_util.keystr(path)}: {e:.3g}")
        buf.check()
    print(f"RESULT scan={scan} flags={os.environ.get('XLA_FLAGS', '')!r} worst={worst:.3g} "
          f"{'OK' if worst < 2e-2 else 'BAD'} (seed {seed})")


if __name__ == "__main__":
    main()
