"""The README's "Use" example runs as written (8 CPU devices) and computes the MoE it shows."""

import os
import re

import numpy as np

import _ep_util as u

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_use_example_runs():
    text = open(os.path.join(ROOT, "README.md")).read()
    code = re.search(r"<!-- use-example -->\n```python\n(.*?)```", text, re.S).group(1)
    env = {}
    exec(compile(code, "README.md: Use", "exec"), env)
    out, x, idx, w = (np.asarray(env[k], np.float32) for k in ("out", "x", "topk_idx", "topk_weights"))
    w_exp = np.asarray(env["w_exp"])
    # dense oracle: each token through its experts on its own fp8-rounded copy
    xq = np.asarray(env["ep"].dequantize(*env["ep"].fp8_cast(env["x"])), np.float32)
    want = np.einsum("tk,tkh->th", w, np.einsum("th,tkhg->tkg", xq, w_exp[idx.astype(int)]))
    assert out.shape == x.shape
    assert u.rel_err(out, want) < 2e-2, u.rel_err(out, want)
