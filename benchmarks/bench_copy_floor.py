"""The GPU's device-to-device copy rate at the LL kernels' message volumes.

Issue 14's T = 128 floor: an LL dispatch writes every message once (send), reads
it back and writes it to the packed output (receive); combine the same in
reverse. How fast this GPU moves those bytes at best bounds the call. This
times torch's copy kernel on buffers of the sizes the LL phases move at
M=128, H=7168, K=8 (1024 messages at T = 128), and on one past the L2, and
prints the rate, counting both the bytes read and the bytes written. Two
ways: 20 back-to-back copies launched from Python between CUDA events
("copy_us": at the LL sizes the host's launches are slower than the copies,
so this is no bound there), and the same 20 copies replayed as one CUDA graph
("graph_copy_us": the GPU's own time per copy, buffers L2-resident below
the L2's size). Medians of --iters.

Needs torch with CUDA (the GPU image has it); not part of the test suite.
    python3 benchmarks/bench_copy_floor.py [--iters 200] [--out X.json]
"""

import argparse
import json
import statistics

import torch

REPS = 20  # copies per event pair


def time_copy(nbytes, iters):
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(10):
        dst.copy_(src)
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(REPS):  # back to back: the events' own overhead spread over REPS
            dst.copy_(src)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / REPS)  # us per copy
    assert torch.equal(dst, src)
    return statistics.median(ts)


def time_graph_copy(nbytes, iters):
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture, as torch's graph docs ask
        for _ in range(3):
            dst.copy_(src)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(REPS):
            dst.copy_(src)
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / REPS)
    assert torch.equal(dst, src)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    h, msgs = 7168, 1024
    sizes = {"fp8 messages (T=128)": msgs * (h + h // 128 * 4 + 16),
             "bf16 messages (T=128)": msgs * (2 * h + 16),
             "256 MiB (past L2: HBM)": 256 << 20}
    rows = []
    print(torch.cuda.get_device_name(), f"torch {torch.__version__}; median of {a.iters} copies")
    for name, n in sizes.items():
        us, gus = time_copy(n, a.iters), time_graph_copy(n, a.iters)
        row = {"what": name, "bytes": n, "copy_us": round(us, 2),
               "read_plus_write_TBps": round(2 * n / us / 1e6, 2),
               "graph_copy_us": round(gus, 2), "graph_read_plus_write_TBps": round(2 * n / gus / 1e6, 2)}
        rows.append(row)
        print(json.dumps(row))
    if a.out:
        with open(a.out + ".json", "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "iters": a.iters, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
