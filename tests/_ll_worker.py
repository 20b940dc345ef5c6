"""Former LL worker, kept as a thin entry point for callers that still start it by path
(tests/test_gpu_one.py's CUDA-graph test): `--mode single [--only a,b] [--steps N]
[--force-port] [--quick] [--seed S]` runs those cases in one process through
tests/ll_run.py and prints PASS/FAIL per case. The cases live in tests/multiprocess/;
multi-process groups start from tests/ll_run.py or tests/test_ll_gpu.py."""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ll_configs  # noqa: E402
import ll_run  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["single"], required=True,
                    help="multi-process groups: python tests/ll_run.py CONFIG")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--chunk", type=int, default=1000)
    ap.add_argument("--force-port", action="store_true")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    # The caller's CUDA_VISIBLE_DEVICES and XLA_FLAGS (e.g. command buffers, an HLO dump) hold.
    env = tuple((k, os.environ[k]) for k in ("CUDA_VISIBLE_DEVICES",) if k in os.environ)
    only = tuple(n for n in a.only.split(",") if n)  # the old names: "graph_replay", "basic_fp8"
    config = ll_configs.LLConfig(
        "worker_single", files=ll_configs.MAIN + (ll_configs.LIFE if only else ()), gpus=1,
        only=only, steps=a.steps, chunk=a.chunk, force_port=a.force_port, quick=a.quick,
        env=env, seed=a.seed)
    return ll_run.report(config)


if __name__ == "__main__":
    sys.exit(main())
