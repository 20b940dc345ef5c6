"""The expert-parallel MoE layer inside a Flax (linen) model, trained with optax.

`EPMoE` owns the layer's params (router, w_in, w_out: the layout of
jax_mscclpp_ep.moe.init_params) and calls the library's pure function: under
jax.shard_map over the "ep" axis with a Buffer when `buffer` is given, densely
(every expert for every token, no exchange) when it is None. Both models start
from the same params and train on the same batches; their losses must agree
step for step.

    python examples/flax_moe.py [--steps 30] [--gpu]
"""

import argparse
import os
import sys

if "--gpu" not in sys.argv:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

import jax_mscclpp_ep as ep
from jax_mscclpp_ep import moe


def _scaled_normal(fan_in_axis):
    # moe.init_params' scale: N(0, 1/fan_in), fan_in = the contracted dimension
    def init(key, shape, dtype=jnp.float32):
        return jax.random.normal(key, shape, dtype) / np.sqrt(shape[fan_in_axis])
    return init


class EPMoE(nn.Module):
    hidden: int
    ffn: int
    num_experts: int
    top_k: int
    mesh: Optional[Mesh] = None
    buffer: Any = None          # ep.Buffer (or EPConfig on CPU); None: dense, no exchange

    @nn.compact
    def __call__(self, x):
        e, h, f = self.num_experts, self.hidden, self.ffn
        params = {"router": self.param("router", _scaled_normal(0), (h, e)),
                  "w_in": self.param("w_in", _scaled_normal(1), (e, h, f)),
                  "w_out": self.param("w_out", _scaled_normal(1), (e, f, h))}
        if self.buffer is None:
            return moe.moe_dense(params, x, top_k=self.top_k)
        return moe.sharded_moe(self.mesh, self.buffer, top_k=self.top_k)(params, x)


class Model(nn.Module):
    hidden: int
    ffn: int
    num_experts: int
    top_k: int
    mesh: Optional[Mesh] = None
    buffer: Any = None

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.hidden, use_bias=False)(x)
        h = h + EPMoE(self.hidden, self.ffn, self.num_experts, self.top_k, self.mesh,
                      self.buffer)(nn.RMSNorm()(h)).astype(jnp.float32)
        return nn.Dense(1)(h)[:, 0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=16, help="tokens per rank")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=64)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--gpu", action="store_true", help="use the GPUs (default: 8 CPU devices)")
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args()
    devices = jax.devices()
    r = len(devices)
    mesh = Mesh(np.array(devices), ("ep",))
    seed = a.seed if a.seed is not None else int.from_bytes(os.urandom(4), "little")
    rng = np.random.default_rng(seed)
    n, h = r * a.tokens, a.hidden
    print(f"{r} x {devices[0].platform}; N={n} H={h} E={a.experts} K={a.topk} seed={seed}")

    config = ep.EPConfig(num_experts=a.experts, max_tokens_per_rank=a.tokens, hidden=h)
    buf = ep.Buffer(config, mesh=mesh)
    kw = dict(hidden=h, ffn=a.ffn, num_experts=a.experts, top_k=a.topk)
    ep_model, dense_model = Model(mesh=mesh, buffer=buf, **kw), Model(**kw)
    teacher = rng.standard_normal(h).astype(np.float32) / np.sqrt(h)
    x0 = jnp.asarray(rng.standard_normal((n, h)), jnp.float32)
    params = dense_model.init(jax.random.key(seed % (1 << 31)), x0)   # the same params for both
    opt = optax.adam(1e-3)

    def make_step(model):
        def loss_fn(p, x, y):
            return jnp.mean((model.apply(p, x) - y) ** 2)

        @jax.jit
        def step(p, s, x, y):
            loss, g = jax.value_and_grad(loss_fn)(p, x, y)
            upd, s = opt.update(g, s, p)
            return optax.apply_updates(p, upd), s, loss
        return step

    curves = {}
    for name, model in (("ep", ep_model), ("dense", dense_model)):
        step, p, s = make_step(model), params, opt.init(params)
        data = np.random.default_rng(seed + 1)
        losses = []
        for _ in range(a.steps):
            x = data.standard_normal((n, h)).astype(np.float32)
            y = np.tanh(x @ teacher * 3).astype(np.float32)
            p, s, loss = step(p, s, jnp.asarray(x), jnp.asarray(y))
            losses.append(float(loss))
        curves[name] = np.asarray(losses)
    buf.close()
    diff = np.abs(curves["ep"] - curves["dense"]) / np.maximum(np.abs(curves["dense"]), 1e-6)
    print("loss ep    " + " ".join(f"{v:.4f}" for v in curves["ep"][:: max(a.steps // 6, 1)]))
    print("loss dense " + " ".join(f"{v:.4f}" for v in curves["dense"][:: max(a.steps // 6, 1)]))
    print(f"rel loss difference: step 0 {diff[0]:.1e}, median {np.median(diff):.1e}, "
          f"max {diff.max():.1e}; loss {curves['ep'][0]:.4f} -> {curves['ep'][-1]:.4f}")
    assert curves["ep"][-1] < 0.7 * curves["ep"][0], "the model did not learn"
    assert diff[0] < 1e-3, "EP and dense Flax models differ on the first step"
    # Later steps: the two programs round differently (f32 summation order), Adam turns
    # that into slightly different params, and now and then a token's top-k flips between
    # two near-equal experts for one step: a spike, not a drift. Typical steps stay close.
    assert np.median(diff) < 1e-2 and diff.max() < 0.15, "EP and dense Flax models diverged"
    print("OK: Flax EP module matches the dense module")


if __name__ == "__main__":
    main()
