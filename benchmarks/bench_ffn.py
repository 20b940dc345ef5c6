"""The MoE layer's expert FFN on dispatch's layout: masked, bucketed, ragged (moe.py).

dispatch delivers [LE, R*M, H] rows per rank of which only recv_count[e] per
expert are valid (about R*M*K/E of R*M). "masked" multiplies the whole layout
(rows past the counts zeroed), "bucketed" the first B rows of each expert (B the
smallest static size holding the fullest expert), "ragged" gathers the valid
rows into [R*M*min(K, LE), H] and uses lax.ragged_dot. No exchange here:
one device, the layout one rank of an R-rank EP group would get, with counts
drawn from random top-k routing of R*T tokens. Forward, and forward + backward
(grads w.r.t. rows and both weights), median of --reps timed calls each.

  python benchmarks/bench_ffn.py [--shapes R,M,H,F,K,E;...] [--out results/ffn_X]
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench_ll import time_calls  # noqa: E402  (this folder: the same timing as bench_ll)
from jax_mscclpp_ep import moe  # noqa: E402

DEFAULT_SHAPES = "2,128,7168,2048,8,256;8,128,7168,2048,8,256;2,128,4096,1408,8,64;2,16,7168,2048,8,256"


def routed_counts(rng, r, m, k, e):
    """Rows per local expert of rank 0 when R*M tokens pick K distinct experts each."""
    le = e // r
    picks = np.stack([rng.permutation(e)[:k] for _ in range(r * m)])
    return np.bincount(picks[picks < le], minlength=le).astype(np.int32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="R,M,H,F,K,E;... (R: EP group size)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    rng = np.random.default_rng()
    dev = jax.devices()[0]
    rows_out = []
    for spec in a.shapes.split(";"):
        r, m, h, f, k, e = (int(v) for v in spec.split(","))
        le, n = e // r, r * m
        counts = routed_counts(rng, r, m, k, e)
        cap = moe.packed_capacity(r, m, k, le)
        key = jax.random.key(int(rng.integers(1 << 31)))
        p = moe.init_params(key, h, f, le)
        w_in, w_out = (jax.device_put(p[n_].astype(jnp.bfloat16), dev) for n_ in ("w_in", "w_out"))
        rows = jax.device_put(jnp.asarray(rng.standard_normal((le, n, h)), jnp.bfloat16), dev)
        cnt = jax.device_put(jnp.asarray(counts), dev)
        ct = jax.device_put(jnp.asarray(rng.standard_normal((le, n, h)), jnp.bfloat16), dev)
        fns = {
            "masked": lambda x, wi, wo, c: moe.expert_ffn(x, wi, wo, c),
            "bucketed": lambda x, wi, wo, c: moe.expert_ffn_bucketed(x, wi, wo, c),
            "ragged": lambda x, wi, wo, c: moe.expert_ffn_ragged(x, wi, wo, c, cap),
        }
        res = {"R": r, "M": m, "H": h, "F": f, "K": k, "E": e, "LE": le, "layout_rows": le * n,
               "valid_rows": int(counts.sum()), "max_count": int(counts.max()),
               "bucket": next(b for b in moe.bucket_sizes(n) if b >= counts.max()),
               "ragged_rows": min(cap, le * n)}
        outs = {}
        for name, fn in fns.items():
            fwd = jax.jit(fn)
            bwd = jax.jit(jax.grad(
                lambda x, wi, wo, c, fn=fn: jnp.sum((fn(x, wi, wo, c) * ct).astype(jnp.float32)),
                argnums=(0, 1, 2)))
            res[f"{name}_fwd_us"] = time_calls(fwd, (rows, w_in, w_out, cnt), a.reps)
            res[f"{name}_fwd_bwd_us"] = time_calls(bwd, (rows, w_in, w_out, cnt), a.reps)
            outs[name] = np.asarray(fwd(rows, w_in, w_out, cnt), np.float32)
        ref = max(np.abs(outs["masked"]).max(), 1e-30)
        res["max_rel_diff"] = float(max(np.abs(outs[v] - outs["masked"]).max() / ref
                                        for v in ("bucketed", "ragged")))
        rows_out.append(res)
        print(json.dumps(res), flush=True)
    title = f"Expert FFN on dispatch's layout, 1x {dev.device_kind} (jax {jax.__version__})"
    lines = [f"# {title}", "",
             "Median of timed jitted calls (µs); counts from random top-k routing; "
             "fwd+bwd = grads w.r.t. rows, w_in, w_out.", "",
             "| R | M | H | F | K | E | layout rows | valid rows | max/bucket | fwd masked / "
             "bucketed / ragged | fwd+bwd masked / bucketed / ragged | max rel diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in rows_out:
        fwd = " / ".join(f"{x[v + '_fwd_us']:.0f}" for v in ("masked", "bucketed", "ragged"))
        both = " / ".join(f"{x[v + '_fwd_bwd_us']:.0f}" for v in ("masked", "bucketed", "ragged"))
        lines.append(f"| {x['R']} | {x['M']} | {x['H']} | {x['F']} | {x['K']} | {x['E']} | "
                     f"{x['layout_rows']} | {x['valid_rows']} | {x['max_count']}/{x['bucket']} | "
                     f"{fwd} | {both} | {x['max_rel_diff']:.1e} |")
    print("\n".join(lines))
    if a.out:
        with open(a.out + ".json", "w") as fh:
            json.dump({"device": dev.device_kind, "jax": jax.__version__, "rows": rows_out}, fh,
                      indent=1)
        with open(a.out + ".md", "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
