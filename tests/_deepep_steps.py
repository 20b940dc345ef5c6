"""One MoE step written two ways, for the CPU and GPU tests of the DeepEP face: as a
DeepEP LL script writes it (Buffer.low_latency_*: tuple results, receive hooks,
cumulative statistics) and with the plain API. Both return
(recv_x, scales, recv_count, src_info, layout_range, stats, combined_x)."""

import jax.numpy as jnp

import jax_mscclpp_ep as ep


def experts(recv_x, use_fp8):
    """A stand-in expert computation on the received rows (bf16 in, bf16 out)."""
    rows = ep.dequantize(*recv_x) if use_fp8 else recv_x.astype(jnp.float32)
    return jnp.tanh(rows * 0.5).astype(jnp.bfloat16)


def _no_scales():
    return jnp.zeros((0,), jnp.float32)


def deepep_step(buf, use_fp8, hook):
    c = buf.config
    m, e = c.max_tokens_per_rank, c.num_experts

    def step(x, topk_idx, topk_weights, stats):
        results = buf.low_latency_dispatch(
            x, topk_idx, m, e, cumulative_local_expert_recv_stats=stats, use_fp8=use_fp8,
            return_recv_hook=hook)
        recv_x, recv_count, handle, event, recv_hook = results
        assert event is None
        if hook:
            assert recv_x is None and recv_count is None and handle is None
            results = recv_hook()
            recv_x, recv_count, handle = results
            assert recv_hook() is results  # the receive half ran once
        else:
            assert recv_hook is None
        combined_x, event, combine_hook = buf.low_latency_combine(
            experts(recv_x, use_fp8), topk_idx, topk_weights, handle, return_recv_hook=hook)
        assert event is None
        if hook:
            assert combined_x is None
            combined_x = combine_hook()
        fp8, scales = recv_x if use_fp8 else (recv_x, _no_scales())
        return (fp8, scales, recv_count, handle.src_info, handle.layout_range, results.stats,
                combined_x)

    return step


def plain_step(buf, use_fp8):
    def step(x, topk_idx, topk_weights, stats):
        res = ep.dispatch(x, topk_idx, buf, use_fp8=use_fp8, stats=stats)
        recv_x = (res.recv_x, res.recv_scales) if use_fp8 else res.recv_x
        out = ep.combine(experts(recv_x, use_fp8), topk_idx, topk_weights, res.handle, buf)
        scales = res.recv_scales if use_fp8 else _no_scales()
        return (res.recv_x, scales, res.recv_count, res.handle.src_info, res.handle.layout_range,
                res.stats, out)

    return step
