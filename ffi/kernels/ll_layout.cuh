// LL buffer layout: where each message lives inside the registered buffer.
// Must match jax_mscclpp_ep/config.py:size_hint (tested via _ep.ll_size_hint).
//
// buffer = [half 0][half 1][mask reports]; half = [send][recv][signal], each
// 128-aligned; mask reports = int64 per source rank + one stage word (issue 17).
// signal = int64 dispatch counters [LE][R] (source rank r adds to its word once
// per message and once with the total: ll_count_delta in ll_args.cuh) followed
// by int64 combine flags [E] (expert e's owner adds 1 when all rows of e for
// this rank have landed).
#pragma once
#include <cstddef>
#include <cstdint>

#include "kernels/ll_hd.h"
#include "kernels/ll_limits.h"

namespace jmep {

constexpr int kLlHeaderBytes = 16; // message header: int32 source token + padding

JMEP_HD int64_t ll_align128(int64_t n) { return (n + 127) / 128 * 128; }
JMEP_HD int64_t ll_max(int64_t a, int64_t b) { return a > b ? a : b; }

struct LlLayout {
  int64_t dispatch_msg;  // header + max(bf16 payload, fp8 payload + scales)
  int64_t combine_msg;   // bf16 row
  int64_t send_off;      // offsets inside one half
  int64_t recv_off;
  int64_t signal_off;
  int64_t half_bytes;
  int64_t mask_off;      // after both halves: int64 mask report per source rank, + our stage

  JMEP_HD static LlLayout make(int64_t m, int64_t h, int64_t r, int64_t e) {
    LlLayout l;
    l.dispatch_msg = kLlHeaderBytes + ll_max(2 * h, h + (h / kLlFp8Block) * 4);
    l.combine_msg = 2 * h;
    const int64_t send = ll_max(m * l.dispatch_msg, e * m * l.combine_msg);
    const int64_t recv = ll_max(e * m * l.dispatch_msg, e * m * l.combine_msg);
    const int64_t signal = 2 * e * 8;
    l.send_off = 0;
    l.recv_off = ll_align128(send);
    l.signal_off = l.recv_off + ll_align128(recv);
    l.half_bytes = l.signal_off + ll_align128(signal);
    l.mask_off = 2 * l.half_bytes;
    l.mask_bytes = ll_align128((r + 1) * 8);
    return l;
  }
  int64_t mask_bytes;
  JMEP_HD int64_t total_bytes() const { return mask_off + mask_bytes; }
  // Rank r's latest mask report to us (r = R: the stage our port puts read from).
  JMEP_HD int64_t mask_word(int64_t r) const { return mask_off + r * 8; }
  JMEP_HD int64_t half_base(int half) const { return half * half_bytes; }
  // Dispatch receive slot for (local expert j, source rank r, slot s).
  JMEP_HD int64_t dispatch_slot(int half, int64_t j, int64_t r, int64_t s, int64_t nranks,
                                int64_t m) const {
    return half_base(half) + recv_off + ((j * nranks + r) * m + s) * dispatch_msg;
  }
  // Combine receive slot for (global expert e, token t).
  JMEP_HD int64_t combine_slot(int half, int64_t e, int64_t t, int64_t m) const {
    return half_base(half) + recv_off + (e * m + t) * combine_msg;
  }
  JMEP_HD int64_t dispatch_counter(int half, int64_t j, int64_t r, int64_t nranks) const {
    return half_base(half) + signal_off + (j * nranks + r) * 8;
  }
  JMEP_HD int64_t combine_flag(int half, int64_t e, int64_t num_experts) const {
    return half_base(half) + signal_off + (num_experts + e) * 8;
  }
};

}  // namespace jmep
