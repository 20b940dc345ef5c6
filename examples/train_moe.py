"""Train a small MoE transformer block with expert parallelism; check it against no EP.

The block: h = x + attention(rmsnorm(x)); out = h + MoE(rmsnorm(h)); a linear
head regresses a fixed random "teacher" on synthetic sequences. The same model
is trained twice from the same initial params with the same batches and Adam:
once with the MoE under shard_map (mesh ("dp", "ep"), tokens exchanged by
dispatch/combine) and once densely (every expert computed for every token,
no exchange). The two loss curves must match step for step within tolerance.

    python examples/train_moe.py [--steps 300] [--gpu] [--plot [PNG]]

--plot alone writes results/train_loss_<platform>.png next to this script
(needs matplotlib: pip install ".[plot]").
"""

import argparse
import os
import sys
import time

if "--gpu" not in sys.argv:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

import jax_mscclpp_ep as ep
from jax_mscclpp_ep import moe


def rmsnorm(x, g):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * g


def init(key, h, f, e):
    ks = jax.random.split(key, 6)
    dense = lambda k, shape: jax.random.normal(k, shape, jnp.float32) / np.sqrt(shape[0])
    return {"moe": moe.init_params(ks[0], h, f, e), "wq": dense(ks[1], (h, h)),
            "wk": dense(ks[2], (h, h)), "wv": dense(ks[3], (h, h)), "wo": dense(ks[4], (h, h)),
            "head": dense(ks[5], (h, h)), "g1": jnp.ones((h,)), "g2": jnp.ones((h,))}


def block(p, x, moe_fn):
    """x [B, S, H] f32 -> [B, S, H]; moe_fn maps (moe params, tokens [N, H]) to [N, H] bf16."""
    b, s, h = x.shape
    a = rmsnorm(x, p["g1"])
    q, k, v = a @ p["wq"], a @ p["wk"], a @ p["wv"]
    att = jnp.einsum("bqh,bkh->bqk", q, k) / np.sqrt(h)
    att = jnp.where(jnp.tril(jnp.ones((s, s), bool)), att, -1e9)
    x = x + jnp.einsum("bqk,bkh->bqh", jax.nn.softmax(att, -1), v) @ p["wo"]
    m = moe_fn(p["moe"], rmsnorm(x, p["g2"]).reshape(b * s, h).astype(jnp.bfloat16))
    x = x + m.astype(jnp.float32).reshape(b, s, h)
    return x @ p["head"]


def teacher(key, h):
    k1, k2 = jax.random.split(key)
    a = jax.random.normal(k1, (h, h)) / np.sqrt(h)
    c = jax.random.normal(k2, (h, h)) / np.sqrt(h)
    return lambda x: jnp.tanh(x @ a) @ c + 0.5 * x


def adam(lr, b1=0.9, b2=0.999, eps=1e-8):
    def update(p, g, state, step):
        m, v = state
        m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, g)
        v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, g)
        c1, c2 = 1 - b1 ** step, 1 - b2 ** step
        p = jax.tree.map(lambda p, m, v: p - lr * (m / c1) / (jnp.sqrt(v / c2) + eps), p, m, v)
        return p, (m, v)
    return update


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=128)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--dp", type=int, default=2, help="data-parallel axis size (must divide #devices)")
    ap.add_argument("--tol", type=float, default=3e-2, help="max relative loss difference allowed")
    ap.add_argument("--plot", nargs="?", const="", default=None,
                    help="write the loss curves to this PNG (alone: results/train_loss_<platform>.png "
                         "beside this script; needs matplotlib)")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args(argv)

    devices = jax.devices()
    dp = a.dp if len(devices) % a.dp == 0 else 1
    mesh = Mesh(np.array(devices).reshape(dp, -1), ("dp", "ep"))
    n = a.batch * a.seq
    if n % len(devices):
        raise SystemExit(f"batch*seq={n} must be a multiple of the {len(devices)} devices")
    seed = a.seed if a.seed is not None else int.from_bytes(os.urandom(4), "little")
    print(f"mesh {dict(mesh.shape)} of {devices[0].platform}; B={a.batch} S={a.seq} "
          f"H={a.hidden} E={a.experts} K={a.topk}; seed={seed}")

    if a.batch % len(devices):
        raise SystemExit(f"--batch {a.batch} must be a multiple of the {len(devices)} devices")
    config = ep.EPConfig(a.experts, n // len(devices), a.hidden)
    buf = ep.Buffer(config, mesh=mesh, axis_name="ep") if a.gpu else config
    ep_moe = lambda p, x: moe.moe_layer(p, x, buf, top_k=a.topk, axis_name="ep")
    dense_moe = lambda p, x: moe.moe_dense(p, x, top_k=a.topk)

    key = jax.random.key(seed)
    kinit, kteach, kdata = jax.random.split(key, 3)
    params = init(kinit, a.hidden, a.ffn, a.experts)
    target = teacher(kteach, a.hidden)
    opt = adam(a.lr)

    def make_step(moe_fn, sharded):
        def loss_fn(p, x):
            return jnp.mean(jnp.square(block(p, x, moe_fn) - target(x)))

        if sharded:  # the whole block per device: sequences split over (dp, ep), experts over ep
            specs = {**{k: P() for k in params}, "moe": moe.param_specs("ep")}
            local_loss = loss_fn
            per_dev = lambda p, x: jax.lax.pmean(local_loss(p, x), ("dp", "ep"))
            loss_fn = jax.shard_map(per_dev, mesh=mesh, in_specs=(specs, P(("dp", "ep"))),
                                    out_specs=P())

        @jax.jit
        def step(p, state, i):
            x = jax.random.normal(jax.random.fold_in(kdata, i), (a.batch, a.seq, a.hidden))
            loss, g = jax.value_and_grad(loss_fn)(p, x)
            p, state = opt(p, g, state, i + 1)
            return p, state, loss
        return step

    zeros = jax.tree.map(jnp.zeros_like, params)
    runs = {}
    for name, fn in (("EP", ep_moe), ("dense", dense_moe)):
        step, p, state, losses = make_step(fn, name == "EP"), params, (zeros, zeros), []
        t0 = time.perf_counter()
        for i in range(a.steps):
            p, state, loss = step(p, state, i)
            # Wait for each step: several in-flight steps with collectives can starve
            # XLA:CPU's thread pool (virtual devices on few cores) and deadlock.
            losses.append(float(loss))
        runs[name] = np.asarray(jax.device_get(losses), np.float64)
        print(f"{name:>5}: {a.steps} steps in {time.perf_counter() - t0:.1f} s; loss "
              f"{runs[name][0]:.4f} -> {runs[name][-1]:.4f}")

    l_ep, l_d = runs["EP"], runs["dense"]
    rel = np.abs(l_ep - l_d) / np.abs(l_d)
    for i in sorted({0, 1, 2, a.steps // 4, a.steps // 2, 3 * a.steps // 4, a.steps - 1}):
        print(f"  step {i:4d}: EP {l_ep[i]:.6f}  dense {l_d[i]:.6f}  |diff| {abs(l_ep[i] - l_d[i]):.2e}")
    print(f"max |loss_EP - loss_dense| = {np.abs(l_ep - l_d).max():.3e}, "
          f"max relative = {rel.max():.3e} (step {int(rel.argmax())})")
    if a.plot is not None:
        platform = devices[0].platform
        path = a.plot or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                      f"train_loss_{platform}.png")
        plot(path, l_ep, l_d, dict(mesh.shape), platform)
    if isinstance(buf, ep.Buffer):
        buf.close()
    if not rel.max() <= a.tol or not l_ep[-1] < l_ep[0]:
        print(f"FAILED: EP and non-EP losses differ by more than {a.tol} (or the loss did not go down)")
        return 1
    print("OK: EP training matches non-EP training step for step")
    return 0


def plot(path, l_ep, l_d, mesh_shape, platform):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib not installed: no plot (pip install ".[plot]")')
        return
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    ax1.plot(l_d, label="dense (no EP)", lw=2.5, alpha=0.6)
    ax1.plot(l_ep, label="expert parallel (dispatch/combine)", lw=1, ls="--")
    ax1.set_yscale("log")
    ax1.set_ylabel("training loss (MSE)")
    ax1.set_title(f"MoE block, mesh {mesh_shape} on {platform}")
    ax1.legend()
    ax2.plot(np.abs(l_ep - l_d) / np.abs(l_d), color="k", lw=0.8)
    ax2.set_ylabel("|rel. diff|")
    ax2.set_xlabel("step")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
