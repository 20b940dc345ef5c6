// Dropping receive-slot lines from the L2 once they are consumed (issue 14).
//
// A slot's payload is dead after the receive read it: the next write to it is
// a peer's, two calls later. Left dirty, the line is written back to HBM when
// it is evicted, in the middle of the next kernel's reads; `discard.global.L2`
// (PTX 7.4, sm_80+) drops it without the write-back.
//
// Ordering (PTX memory model): a discard is a weak write of an indeterminate
// value to the 128 bytes. Only lines wholly inside what the issuing warp has
// just read are dropped, after the warp's own uses of those loads (so they
// have returned) and a __syncwarp (which orders the other lanes' reads of the
// line before it). The next writer of the line is a peer in call n + 2, and
// it writes only after acquiring our call n + 1 signal (every rank waits for
// every peer's counts in dispatch and flags in combine); our call n + 1
// release follows the discard in stream order (kernel boundary) and is
// cumulative, so the peer's write is coherence-after the discard and the slot
// holds the peer's data, whether it comes as NVLink stores, a proxy's copy or
// a NIC's write (all go through the owning GPU's L2). Header words, signal
// words and lines shared with a neighbouring message are never dropped.
//
// Only where it pays: the write-backs saved only slow the next kernel once a
// step's dirty data outgrows the L2 (a step dirties about four payloads:
// dispatch slots, its output, the experts' output, combine slots), and the
// discarding code costs small calls time (with it compiled into the one
// reduce instance, T = 1 combine took 0.5 us longer on the H200 even with the
// discards not taken: the reduce that discards is a kernel instance of its
// own). On the H200 (60 MiB L2) discards lost at T = 64 (7.3 MB of bf16 rows
// a call) and won at T = 128 (14.7 MB; combine 15.8 -> 14.5 us). Both kernels
// of a step discard when its T x K bf16 rows reach L2 / 6, between the two
// (ll_step_discards in handlers/ll_call.h says why dispatch follows combine).
// benchmarks/results/ll_latency_discard_h200x1.md.
//
// -DJMEP_LL_DISCARD=<bits>: 1 dispatch's receive slots, 2 combine's. Default 0
// (compiled out; the kernels' SASS is then main's, instruction for
// instruction) until a build with both (3) is measured in this form: the runs
// so far had the reduce's discards behind a runtime branch, and gated each
// kernel on its own payload.
#pragma once
#include <cstdint>

#ifndef JMEP_LL_DISCARD
#define JMEP_LL_DISCARD 0
#endif

namespace jmep {

constexpr bool kLlDiscardDispatch = (JMEP_LL_DISCARD & 1) != 0;
constexpr bool kLlDiscardCombine = (JMEP_LL_DISCARD & 2) != 0;

// LlEntry::discard_bytes for a device with an L2 of l2_bytes. -DJMEP_LL_DISCARD_PART=n:
// a step discards once its T x K bf16 rows reach L2 / n bytes (a huge n: always).
#ifndef JMEP_LL_DISCARD_PART
#define JMEP_LL_DISCARD_PART 6
#endif
constexpr int64_t ll_discard_bytes(int64_t l2_bytes) { return l2_bytes / (JMEP_LL_DISCARD_PART); }

// Drop the 128-byte line at p (128-aligned, global memory).
__device__ __forceinline__ void ll_discard_line(const void* p) {
#if JMEP_LL_DISCARD && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("discard.global.L2 [%0], 128;" ::"l"(__cvta_generic_to_global(p)) : "memory");
#else
  (void)p;
#endif
}

// A converged warp that has consumed [begin, end) drops the lines wholly
// inside it, lane l taking lines l, l + 32, ...
__device__ __forceinline__ void ll_warp_discard(const void* begin, const void* end, int lane) {
  __syncwarp();
  const uintptr_t b = reinterpret_cast<uintptr_t>(begin), e = reinterpret_cast<uintptr_t>(end);
  for (uintptr_t line = ((b + 127) & ~uintptr_t(127)) + uintptr_t(lane) * 128; line + 128 <= e;
       line += 32 * 128)
    ll_discard_line(reinterpret_cast<const void*>(line));
}

}  // namespace jmep
