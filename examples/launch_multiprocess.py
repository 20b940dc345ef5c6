"""One process per device via jax.distributed on 127.0.0.1: the MoE layer, forward and backward.

    python examples/launch_multiprocess.py --nprocs 2 --gpu   # one process per GPU
    python examples/launch_multiprocess.py --nprocs 4         # 4 CPU processes (debugging)
    python examples/launch_multiprocess.py --nprocs 4 --gpu --ranks-per-host 2
        # 4 GPUs as 2 simulated hosts x 2: UCX between the hosts, NVLink inside each

The launcher starts --nprocs copies of itself (--rank i); each initialises
jax.distributed, creates the Buffer after it (peers exchange what they need
through JAX's key-value store), runs moe_layer under shard_map over every
process's device, and checks its own shard of the output and of the expert
gradients against the dense model computed locally from the same seed. With
--gpu every process sees all GPUs (CUDA IPC needs that) and uses GPU i (the
model's own XLA collectives, NCCL, refuse two ranks on one GPU, so this needs
as many GPUs as processes). --ranks-per-host N gives process i the host
identity JMEP_HOST_ID=simhost<i // N>: processes of different simulated hosts
reach each other through UCX port channels (pip install jax_mscclpp_ep[ucx];
UCX_TLS defaults to tcp,cuda_copy here, as between hosts without InfiniBand),
exactly as on a real multi-host pod.
"""

import argparse
import os
import sys

from local_ranks import init_rank, run_ranks


def launch(a) -> int:
    def env_of(i, env):
        if not a.ranks_per_host:
            return env
        # hosts without InfiniBand; not shared memory
        return dict(env, JMEP_HOST_ID=f"simhost{i // a.ranks_per_host}",
                    UCX_TLS=env.get("UCX_TLS", "tcp,cuda_copy"))

    codes = run_ranks(__file__, a.nprocs, a.passthrough, a.timeout, env_of)
    if codes is None:
        print("FAILED: timed out")
        return 1
    if any(codes):
        print(f"FAILED: exit codes {codes}")
        return 1
    print(f"OK: all {a.nprocs} processes passed")
    return 0


def worker(a) -> int:
    jax = init_rank(a, [a.rank])
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import jax_mscclpp_ep as ep
    from jax_mscclpp_ep import moe

    r, t, h, e, k = a.nprocs, a.tokens, a.hidden, a.experts, a.topk
    mesh = Mesh(np.array(jax.devices()), ("ep",))
    buf = ep.Buffer(ep.EPConfig(e, t, h), mesh=mesh)      # after jax.distributed.initialize
    if buf.peer_channels():                                # GPU: how this rank reaches each peer
        print(f"[rank {a.rank}] host {os.environ.get('JMEP_HOST_ID', '(this machine)')}, "
              f"channels {[c.split(chr(10))[0] for c in buf.peer_channels()[a.rank]]}")
    kp, kx = jax.random.split(jax.random.key(a.seed))
    host = jax.local_devices()[0]
    with jax.default_device(host):   # same global data on every process (same seed)
        params = jax.device_get(moe.init_params(kp, h, 2 * h, e))
        x = np.asarray(jax.random.normal(kx, (r * t, h), jnp.float32).astype(jnp.bfloat16))

    def global_array(v, spec):
        return jax.make_array_from_callback(v.shape, NamedSharding(mesh, spec), lambda i: v[i])

    specs = moe.param_specs()
    gparams = {n: global_array(v, specs[n]) for n, v in params.items()}
    gx = global_array(x, P("ep"))
    f = moe.sharded_moe(mesh, buf, top_k=k)
    loss = lambda p, xx: jnp.sum(jnp.square(f(p, xx).astype(jnp.float32)))
    out = jax.jit(f)(gparams, gx)
    g = jax.jit(jax.grad(loss))(gparams, gx)

    with jax.default_device(host):
        dense = jax.jit(lambda p, xx: moe.moe_dense(p, xx, top_k=k))
        want = np.asarray(dense(params, x), np.float32)
        gd = jax.device_get(jax.jit(jax.grad(lambda p, xx: jnp.sum(
            jnp.square(moe.moe_dense(p, xx, top_k=k).astype(jnp.float32)))))(params, x))
    ok = True
    for name, got, ref in [("out", out, want), ("d w_in", g["w_in"], gd["w_in"]),
                           ("d router", g["router"], gd["router"])]:
        for sh in got.addressable_shards:
            a_, b_ = np.asarray(sh.data, np.float32), np.asarray(ref[sh.index], np.float32)
            err = np.abs(a_ - b_).max() / max(np.abs(b_).max(), 1e-30)
            ok &= bool(err < 3e-2)
            s0 = sh.index[0] if sh.index else slice(None)
            print(f"[rank {a.rank}] {name} rows [{s0.start}:{s0.stop}]: rel err {err:.2e}")
    buf.close()
    print(f"[rank {a.rank}] {'OK' if ok else 'FAILED'}")
    jax.distributed.shutdown()
    return 0 if ok else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--tokens", type=int, default=16, help="tokens per process")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--ranks-per-host", type=int, default=0,
                    help="simulate hosts of N processes each (JMEP_HOST_ID); 0: one machine")
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.passthrough = [f"--nprocs={a.nprocs}", f"--tokens={a.tokens}", f"--hidden={a.hidden}",
                     f"--experts={a.experts}", f"--topk={a.topk}"] + (["--gpu"] if a.gpu else [])
    return worker(a) if a.rank is not None else launch(a)


if __name__ == "__main__":
    sys.exit(main())
