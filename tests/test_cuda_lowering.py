"""The CUDA lowering, checked here without a GPU (jax lowers for "cuda" on any machine):
every LL custom call sits between optimization barriers, so XLA:GPU's dynamic-slice
fusion cannot fold the slicing of lax.scan residuals into it (that gave wrong gradients
of scanned layers on the kernels, see gpu.isolated_call)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import jax_mscclpp_ep as ep

import _layers

pytestmark = pytest.mark.skipif(not ep.cuda_enabled(), reason="needs the CUDA build")


def _scanned_grad_text():
    mesh = Mesh(np.array(jax.devices()[:1]), ("ep",))
    n_layers, h, f, e, k, n = 3, 128, 64, 8, 4, 16
    rng = np.random.default_rng()
    layers = _layers.init_layers(jax.random.key(int(rng.integers(1 << 31))), n_layers, h, f, e)
    x = jnp.asarray(rng.standard_normal((n, h)), jnp.bfloat16)
    with ep.Buffer(ep.EPConfig(e, n, h), mesh=mesh) as buf:
        model = _layers.ep_model(mesh, buf, scan=True, top_k=k)
        grad = jax.jit(jax.grad(lambda p, xx: jnp.sum(model(p, xx).astype(jnp.float32)),
                                argnums=(0, 1)))
        return grad.trace(_layers.stack(layers), x).lower(lowering_platforms=("cuda",)).as_text()


def test_every_custom_call_of_a_scanned_gradient_sits_between_barriers():
    text = _scanned_grad_text()
    barrier_outs = set()
    calls = 0
    for line in text.splitlines():
        m = re.match(r"\s*(%[\w#:]+)(?::\d+)? = stablehlo.optimization_barrier", line)
        if m:
            barrier_outs.add(m.group(1).split(":")[0])
            continue
        if "stablehlo.custom_call @jmep_ll_" in line:
            calls += 1
            operands = re.search(r"custom_call @\w+\(([^)]*)\)", line).group(1)
            for op in filter(None, (o.strip() for o in operands.split(","))):
                assert op.split("#")[0] in barrier_outs, f"operand {op} not from a barrier: {line}"
    # forward dispatch + combine; backward gather_rows, scatter_rows and combine
    assert calls == 5, text
    assert text.count("stablehlo.optimization_barrier") == 2 * calls
