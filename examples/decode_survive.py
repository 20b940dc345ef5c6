"""A decode loop that keeps serving after a rank is lost: its router reads ep.alive_experts.

Each step routes with the lost ranks' experts at -inf (``ep.alive_experts(buf)``), so no
token is sent to them and the top-k weights renormalise over the live experts. Here,
on one process, the loss is simulated mid-loop with ``buf.mask_ranks([R - 1])``; the
lost rank's own slots then get no MoE output (their state stays as it was). Every step
is checked against a dense model routed with the same live experts.

On GPUs in a multi-process job, make the Buffer with ``on_peer_failure="mask"`` and run
the same step: when a process dies, the survivors' next call masks it after
``timeout_s`` and ``alive_experts`` reads the device mask in the compiled step (no host
work, no retrace), so the loop carries on; ``buf.masked_ranks()`` / ``buf.mask_events()``
say who was lost (README "Surviving a lost rank"). On CPU, mask_ranks clears JAX's
caches and the next step retraces with the new mask.

    python examples/decode_survive.py [--steps 8] [--gpu]
"""

import argparse
import os
import sys

import decode_loop  # noqa: F401  (its import sets up 8 CPU devices unless --gpu)

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

import jax_mscclpp_ep as ep
from jax_mscclpp_ep import moe
from survive_step import dense_step_fn, ep_step_fn


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--lose-at", type=int, default=None, help="step at which the last rank is lost")
    ap.add_argument("--slots", type=int, default=8, help="decode slots (tokens) per rank")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--gpu", action="store_true")
    a = ap.parse_args(argv)

    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("ep",))
    r, t, h, e, k = len(devices), a.slots, a.hidden, a.experts, a.topk
    lose_at = a.steps // 2 if a.lose_at is None else a.lose_at
    buf = ep.Buffer(ep.EPConfig(e, t, h), mesh=mesh, on_peer_failure="mask")
    seed = int.from_bytes(os.urandom(4), "little")
    kp, kx = jax.random.split(jax.random.key(seed))
    params = moe.init_params(kp, h, 2 * h, e)
    print(f"{r} x {devices[0].platform}; {r * t} slots, {a.steps} steps, rank {r - 1} lost at "
          f"step {lose_at}, seed={seed}")

    ep_step, dense = ep_step_fn(buf, k), dense_step_fn(e, k)
    step = jax.jit(jax.shard_map(lambda p, hs, o: ep_step(p, hs, o[0]), mesh=mesh,
                                 in_specs=(moe.param_specs(), P("ep"), P("ep")),
                                 out_specs=(P("ep"), P("ep"))))

    def dense_step(p, hs, alive, served):   # the lost rank's own slots get no MoE output
        return jnp.where(served[:, None], dense(p, hs, alive), hs)

    hs = np.asarray(jax.random.normal(kx, (r * t, h), jnp.float32))
    order = jnp.zeros((r,), jnp.int32)
    worst, owner = 0.0, np.repeat(np.arange(r), t)
    for s in range(a.steps):
        if s == lose_at:
            buf.mask_ranks([r - 1])   # on GPUs with on_peer_failure="mask": a dead process
            print(f"step {s}: lost rank {r - 1}; masked ranks {buf.masked_ranks()}")
        lost = buf.masked_ranks()
        alive = np.array([x // (e // r) not in lost for x in range(e)])
        new, order = step(params, hs, order)
        new = np.asarray(new)
        want = np.asarray(dense_step(params, hs, alive, ~np.isin(owner, lost)))
        err = np.abs(new - want).max() / np.abs(want).max()
        worst = max(worst, err)
        frozen = np.array_equal(new[np.isin(owner, lost)], hs[np.isin(owner, lost)])
        print(f"step {s}: live experts {int(alive.sum())}/{e}, rel err {err:.1e}"
              + (f", lost rank's slots unchanged: {frozen}" if lost else ""))
        if lost and not frozen:
            worst = np.inf
        hs = new
    buf.close()
    if not worst < 2e-2:
        print("FAILED: the loop differs from the dense model routed over the live experts")
        return 1
    print("OK: decode loop kept serving after losing a rank")
    return 0


if __name__ == "__main__":
    sys.exit(main())
