// Division by a divisor fixed at registration (ranks, local experts): a
// multiply-high and a shift instead of the ~25-instruction runtime division
// routine. At small T an LL call runs each instruction about once, and these
// sit between a load that returned and the load it feeds (the owner of an
// expert, the (expert, rank) of a pair), so the routine's length is latency.
//
// With l = ceil(log2 d) and m = floor(2^32 (2^l - d) / d) + 1 (< 2^32),
// n / d = (umulhi(n, m) + n) >> l for 0 <= n < 2^31 (the sum cannot carry
// out of 32 bits there). tests/test_divisor.py checks it against / and %.
#pragma once
#include <cstdint>

#include "kernels/ll_hd.h"

namespace jmep {

struct LlDivisor {
  uint32_t mul;
  int32_t shift;
  int32_t d;

  // d >= 1 (callers check their divisors before registration).
  static LlDivisor make(int32_t d) {
    int l = 0;
    while ((int64_t{1} << l) < d) ++l;
    const uint64_t m = ((uint64_t{1} << 32) * ((uint64_t{1} << l) - d)) / d + 1;
    return {static_cast<uint32_t>(m), l, d};
  }
  // 0 <= n < 2^31.
  JMEP_HD int32_t div(int32_t n) const {
    const uint32_t u = static_cast<uint32_t>(n);
#if defined(__CUDA_ARCH__)
    const uint32_t hi = __umulhi(u, mul);
#else
    const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(u) * mul) >> 32);
#endif
    return static_cast<int32_t>((hi + u) >> shift);
  }
  JMEP_HD int32_t mod(int32_t n) const { return n - div(n) * d; }
};

#if defined(__CUDACC__)
// Work splits (blocks per token, warps per row) are powers of two, so that
// the index arithmetic on them is shifts and masks. ceil(log2 x), x >= 1.
__device__ __forceinline__ int ll_log2_ceil(int x) { return 32 - __clz(x - 1); }
// floor(log2 x), x >= 1.
__device__ __forceinline__ int ll_log2_floor(int x) { return 31 - __clz(x); }
// The largest sh <= max_sh with (tokens << sh) <= grid (0 when none): how many
// blocks (1 << sh) may share a token while every token still gets its blocks.
__device__ __forceinline__ int ll_split_shift(int tokens, int grid, int max_sh) {
  int sh = 0;
  while (sh < max_sh && (tokens << (sh + 1)) <= grid) ++sh;
  return tokens > 0 ? sh : 0;
}
#endif

}  // namespace jmep
