"""The CUDA lowering, checked here without a GPU (jax lowers for "cuda" on any machine):
every LL custom call's results go through an optimization barrier, so XLA:GPU's
dynamic-slice fusion cannot fold the stacking of lax.scan residuals into it (that gave
wrong gradients of scanned layers on the kernels, see lowering.isolated_call)."""

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


def test_every_custom_call_of_a_scanned_gradient_feeds_a_barrier():
    text = _scanned_grad_text()
    results, barrier_inputs = [], set()
    for line in text.splitlines():
        m = re.match(r"\s*(%[\w]+)(?::\d+)? = stablehlo.custom_call @jmep_ll_", line)
        if m:
            results.append(m.group(1))
            continue
        m = re.search(r"stablehlo.optimization_barrier ([^:]*)", line)
        if m:
            barrier_inputs |= {o.strip().split("#")[0] for o in m.group(1).split(",")}
    # forward dispatch + combine; backward gather_rows, scatter_rows and combine
    assert len(results) == 5, text
    for r in results:
        assert r in barrier_inputs, f"results of {r} do not go through a barrier"
    assert text.count("stablehlo.optimization_barrier") == len(results)


def test_alive_experts_is_one_custom_call_behind_a_barrier():
    """alive_experts lowers to the jmep_ll_alive custom call (no host mask baked in): its
    results, int32[E] and the order token, pass through the barrier like the exchanges'."""
    mesh = Mesh(np.array(jax.devices()[:1]), ("ep",))
    with ep.Buffer(ep.EPConfig(8, 16, 128), mesh=mesh, on_peer_failure="mask") as buf:
        f = jax.jit(jax.shard_map(lambda: ep.alive_experts(buf)[None], mesh=mesh, in_specs=(),
                                  out_specs=jax.sharding.PartitionSpec("ep")))
        text = f.trace().lower(lowering_platforms=("cuda",)).as_text()
    calls = re.findall(r"stablehlo.custom_call @(jmep_ll_\w+)", text)
    assert calls == ["jmep_ll_alive"], text
    assert "tensor<8xi32>" in text and text.count("stablehlo.optimization_barrier") == 1, text
