"""A decode loop over several processes that keeps serving after one of them is killed.

One process per rank (jax.distributed on 127.0.0.1). Each step routes with the lost ranks'
experts at -inf (``ep.alive_experts(buf)``, read from the device mask inside the compiled
step), dispatches, runs the experts, combines. At step --lose-at the last rank is lost:

- ``--gpu``: it SIGKILLs itself right after enqueuing that step (``--kill-when finished``:
  once that step is done, so the loss falls between two steps). The survivors' Buffer
  (``on_peer_failure="mask"``, ``timeout_s=2``) masks it within that step or the next and
  the loop carries on without it; nobody restarts anything.
- CPU (the reference path): a process cannot be lost, so every process calls
  ``buf.mask_ranks([R - 1])`` at that step instead (what a health check would do).

Each survivor checks its own slots at every step against a dense model routed over the
live experts. While the loss is being found a token may match the full model, or the full
routing with the lost rank's experts contributing zero (the call it was lost in).

    python examples/decode_survive_kill.py --nprocs 4 --gpu --share-gpu  # 4 processes on GPU 0
    python examples/decode_survive_kill.py --nprocs 2                    # CPU processes
"""

import argparse
import os
import signal
import sys
import time

from local_ranks import init_rank, run_ranks


def launch(a) -> int:
    codes = run_ranks(__file__, a.nprocs, a.argv, a.timeout)
    if codes is None:
        print("FAILED: timed out")
        return 1
    victim = -signal.SIGKILL if a.gpu else 0   # on GPUs the last rank kills itself
    if codes[:-1] != [0] * (a.nprocs - 1) or codes[-1] != victim:
        print(f"FAILED: exit codes {codes}")
        return 1
    print(f"OK: the survivors kept serving after losing rank {a.nprocs - 1}")
    return 0


def worker(a) -> int:
    # The survivors outlive the lost process: jax.distributed must not end them first.
    jax = init_rank(a, [0] if a.share_gpu else [a.rank], heartbeat_timeout_seconds=600)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import jax_mscclpp_ep as ep
    from jax_mscclpp_ep import kv, moe
    from survive_step import dense_step_fn, ep_step_fn, rmsnorm, route

    r, t, h, e, k, me = a.nprocs, a.slots, a.hidden, a.experts, a.topk, a.rank
    lost_rank = r - 1
    mesh = Mesh(np.array(sorted(jax.devices(), key=lambda d: d.id)), ("ep",))
    buf = ep.Buffer(ep.EPConfig(e, t, h), mesh=mesh, on_peer_failure="mask", timeout_s=2.0)
    host = jax.local_devices(backend="cpu")[0]
    kp, kx = jax.random.split(jax.random.key(a.seed))
    with jax.default_device(host):   # the same parameters and start state on every process
        params = jax.device_get(moe.init_params(kp, h, 2 * h, e))
        hs_all = np.asarray(jax.random.normal(kx, (r * t, h), jnp.float32))

    ep_step, dense_step = ep_step_fn(buf, k), dense_step_fn(e, k)
    step = jax.jit(jax.shard_map(lambda p, hs, o: ep_step(p, hs, o[0]), mesh=mesh,
                                 in_specs=(moe.param_specs(), P("ep"), P("ep")),
                                 out_specs=(P("ep"), P("ep"))))

    def put(v, spec):
        return jax.make_array_from_callback(v.shape, NamedSharding(mesh, spec), lambda i: v[i])

    specs = moe.param_specs()
    gparams = {n: put(v, specs[n]) for n, v in params.items()}
    hparams = jax.device_put(params, host)
    hs = put(hs_all, P("ep"))
    order = put(np.zeros((r,), np.int32), P("ep"))
    alive_all = np.ones(e, bool)
    alive_cut = np.array([x // (e // r) != lost_rank for x in range(e)])
    worst, window, found = 0.0, 0, False   # found: the mask was in force before this step
    step(gparams, hs, order)   # a warm-up step: compiled everywhere before anyone is lost
    kv.put(kv.client(), f"decode_survive_kill/compiled/{me}", b"1")
    for p in range(r):
        kv.get(kv.client(), f"decode_survive_kill/compiled/{p}", 300_000)
    for s in range(a.steps):
        if s == a.lose_at and not a.gpu:
            buf.mask_ranks([lost_rank])
        mine = np.asarray(hs.addressable_shards[0].data)
        t0 = time.perf_counter()
        hs, order = step(gparams, hs, order)
        if s == a.lose_at and a.gpu and me == lost_rank:
            if a.kill_when == "finished":   # lost between steps: the others finish this one
                np.asarray(hs.addressable_shards[0].data)
            print(f"[rank {me}] step {s}: SIGKILL to myself", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        new = np.asarray(hs.addressable_shards[0].data)
        dt = time.perf_counter() - t0
        def rel_err(*models):   # each model: (routed over, answered by); per token the closest
            with jax.default_device(host):
                wants = [np.asarray(dense_step(hparams, mine, *m)) for m in models]
            errs = np.array([np.abs(new - w).max(-1) for w in wants]) / np.abs(wants[0]).max()
            if len(models) > 1:   # the window: which model each token matches, for the log
                with jax.default_device(host):
                    idx, _ = route(hparams["router"], rmsnorm(mine).astype(jnp.bfloat16),
                                   alive_all, k)
                to_lost = np.isin(np.asarray(idx) // (e // r), [lost_rank]).any(-1)
                print(f"[rank {me}] step {s} window: per-model max err over tokens routed to "
                      f"the lost rank {errs[:, to_lost].max(-1) if to_lost.any() else '-'}, "
                      f"others {errs[:, ~to_lost].max(-1) if (~to_lost).any() else '-'}, "
                      f"no MoE {np.abs(new - mine).max() / np.abs(wants[0]).max():.1e}",
                      flush=True)
            return errs.min(0).max()

        masked = buf.masked_ranks()
        if s < a.lose_at:
            err = rel_err((alive_all,))
        elif me == lost_rank:   # CPU: the rank the others masked; its slots get no MoE output
            err = 0.0 if np.array_equal(new, mine) else np.inf
        elif not found:   # the loss being found (this step, or it still is): any model
            window += 1
            found = masked == [lost_rank]
            # Before the mask, after it, or the step it was found in: routed to the lost
            # rank, whose experts' outputs never came (zero, and a mask event says so).
            err = rel_err((alive_cut,), (alive_all,), (alive_all, alive_cut))
            if window > 2 or (a.gpu and dt > 3.0):   # timeout_s + 1 s
                print(f"[rank {me}] FAILED: step {s} took {dt:.1f} s, masked {masked}")
                worst = np.inf
        else:
            err = rel_err((alive_cut,))
        worst = max(worst, err)
        print(f"[rank {me}] step {s}: {dt * 1e3:.0f} ms, masked {masked}, live experts "
              f"{int(e - e // r * len(masked))}/{e}, rel err {err:.1e}", flush=True)
    ok = worst < 2e-2 and buf.masked_ranks() == [lost_rank]
    print(f"[rank {me}] {'OK' if ok else 'FAILED'}: events {buf.mask_events()}", flush=True)
    if not a.gpu:
        buf.close()
        jax.distributed.shutdown()
        return 0 if ok else 1
    # Rank 0 hosts the coordination service: it leaves after the other survivors, and
    # nobody waits in jax.distributed's shutdown for the lost process.
    kv.put(kv.client(), f"decode_survive_kill/done/{me}", b"1")
    if me == 0:
        for p in range(1, lost_rank):
            kv.get(kv.client(), f"decode_survive_kill/done/{p}", 120_000)
    sys.stdout.flush()
    os._exit(0 if ok else 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nprocs", type=int, default=4)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--share-gpu", action="store_true", help="every process on GPU 0")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--lose-at", type=int, default=4)
    ap.add_argument("--kill-when", choices=("enqueued", "finished"), default="enqueued",
                    help="--gpu: the lost rank dies right after enqueuing step --lose-at "
                         "(mid-step, as a rule) or after that step has finished")
    ap.add_argument("--slots", type=int, default=8, help="decode slots (tokens) per rank")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.argv = [x for x in (argv if argv is not None else sys.argv[1:])
              if not x.startswith(("--rank", "--port", "--seed"))]
    return worker(a) if a.rank is not None else launch(a)


if __name__ == "__main__":
    sys.exit(main())
