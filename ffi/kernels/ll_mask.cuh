// Rank masks inside the LL kernels (issue 17): masking a peer, telling the
// group, and the waits that give up on a peer under on_peer_failure="mask".
//
// Reports. Rank r's report word on rank q (LlLayout::mask_word(r) in q's
// buffer) holds the ranks r has masked. Reports only ever gain bits, so every
// write is an OR (a system-scope atomic for a direct peer; for a port peer a
// put of our stage word, which itself only gains bits by atomic ORs): two
// writers racing cannot take a bit away, and a late report is harmless. A
// report is a hint to stop waiting, never a data dependency, so no release
// pairs with its reads; the fence before a put only makes the stage word's
// new bits visible to the proxy's copy.
#pragma once
#include "kernels/ll_args.cuh"

namespace jmep {

// Send `bits` (the ranks we have masked) to every peer we still hear from:
// threads first, first + stride, ... of the caller share the peers. Everything
// here is out of line: it runs once a call at most, in one warp, and the hot
// paths it would sit between are fetched on every call (ll_dispatch.cu).
static __device__ __noinline__ void ll_send_mask_report(const LlStatic& s, unsigned long long bits,
                                                    int first, int stride) {
  const LlLayout& L = s.layout;
  const int R = s.nranks;
  bool any_port = false;
  for (int p = 0; p < R; ++p)
    any_port |= p != s.rank && !ll_is_masked(bits, p) && s.peer_kind[p] == kLlPort;
  if (any_port && first == 0) {
    atomicOr(reinterpret_cast<unsigned long long*>(s.local + L.mask_word(R)), bits);
    __threadfence_system();  // the stage word before any put that reads it
  }
  if (stride > 1) __syncwarp();  // (stride > 1: a warp shares the peers, first == lane)
  for (int p = first; p < R; p += stride) {
    if (p == s.rank || ll_is_masked(bits, p)) continue;
    if (s.peer_kind[p] == kLlPort)
      ll_port_put(s.handles, p, L.mask_word(s.rank), L.mask_word(R), 8);
    else
      atomicOr_system(reinterpret_cast<unsigned long long*>(s.peer_base[p] + L.mask_word(s.rank)),
                      bits);
  }
}

// Mask peer p in this kernel. The thread that sets the bit records who masked
// it (`by`: this rank, or the peer whose report it took) and where; when this
// rank found p silent itself, it tells the group at once, so survivors still
// waiting on p stop within a poll instead of each running into its own timeout
// (which, when they detect at different times, would make the early ones wait
// on the late ones for as long as the timeout).
static __device__ __noinline__ void ll_mask_peer(const LlStatic& s, int p, int phase, int by) {
  const unsigned long long bit = 1ull << p;
  const unsigned long long old = atomicOr(&s.state->masked, bit);
  if ((old & bit) != 0) return;
  s.state->mask_by[p] = by;
  s.state->mask_phase[p] = phase;
  if (by == s.rank) ll_send_mask_report(s, old | bit, 0, 1);
}

// A peer we still hear from (not masked in `now`) that reports p masked, or -1.
__device__ __forceinline__ int ll_reporter_of(const LlStatic& s, int p, unsigned long long now) {
  for (int r = 0; r < s.nranks; ++r) {
    if (r == s.rank || r == p || ll_is_masked(now, r)) continue;
    const unsigned long long rep =
        *reinterpret_cast<const volatile unsigned long long*>(s.local + s.layout.mask_word(r));
    if (ll_is_masked(rep, p)) return r;
  }
  return -1;
}

// Under on_peer_failure="mask", every kLlPollEvery spins of a wait on p: a
// reason to give up on p? p masked in this kernel already, the proxy's record
// of a lost connection to p, a peer's report that it masked p, or the timeout.
// The first three end the wait within microseconds of the event. Not inlined:
// the waits' fast path (the LL kernels' critical path) keeps its registers.
static __device__ __noinline__ bool ll_give_up_on(const LlStatic& s, int p, int phase, uint64_t start) {
  const unsigned long long now = *reinterpret_cast<volatile unsigned long long*>(&s.state->masked);
  if (ll_is_masked(now, p)) return true;
  const ErrorRecord* e = s.error;
  const bool lost = e != nullptr &&
                    *reinterpret_cast<const volatile int32_t*>(&e->code) == kErrPeerLost &&
                    *reinterpret_cast<const volatile int32_t*>(&e->peer) == p;
#if defined(JMEP_LL_NO_REPORT_WAIT)  // experiment: waits that do not read the reports
  const int reporter = -1;
#else
  const int reporter = lost ? -1 : ll_reporter_of(s, p, now);
#endif
  if (reporter >= 0) {
    ll_mask_peer(s, p, kPhaseMaskReport, reporter);
    return true;
  }
  if (!lost && (s.timeout_ns <= 0 || globaltimer_ns() - start <= uint64_t(s.timeout_ns)))
    return false;
  ll_mask_peer(s, p, lost ? kPhaseProxy : phase, s.rank);
  return true;
}

// Wait until pred(signal word) holds; returns the value, or 0 when peer p is
// given up on. Under on_peer_failure="raise" that is today's wait (a timeout is
// recorded and ends every wait). Under "mask", a wait ends on ll_give_up_on and
// the call completes on the others.
template <typename Pred>
__device__ __forceinline__ int64_t ll_wait_peer(const LlStatic& s, const char* word, Pred pred,
                                                int p, int phase) {
  if (!s.mask_on_failure) {
    const WaitSite site{s.error, s.timeout_ns, s.rank, p, phase};
    return ll_wait_signal(word, pred, site);
  }
  return ll_spin(word, pred, [&](uint64_t start, int64_t) { return ll_give_up_on(s, p, phase, start); });
}

// Every dispatch's send phase, once this rank has masked peers: our mask goes
// to each reachable peer's report word for us, and we take every bit the peers
// we still hear from report (from the next call on; a wait already under way
// takes it at its next poll, above). Masked peers' reports are not read. One
// warp of one block, off the critical path.
static __device__ __noinline__ void ll_exchange_mask_reports(const LlStatic& s, const LlCallMask& call) {
  const LlLayout& L = s.layout;
  const int lane = threadIdx.x & 31, R = s.nranks;
  if (call.self_masked) return;
  const unsigned long long mask = call.bits;
  if (mask != 0) ll_send_mask_report(s, mask, lane, 32);
  for (int r = lane; r < R; r += 32) {
    if (r == s.rank || ll_is_masked(mask, r)) continue;
    const unsigned long long news =
        *reinterpret_cast<const volatile unsigned long long*>(s.local + L.mask_word(r)) & ~mask;
    for (int b = 0; b < R; ++b) {
      if (!ll_is_masked(news, b)) continue;
      const unsigned long long bit = 1ull << b;
      if ((atomicOr(&s.state->masked, bit) & bit) == 0) {
        s.state->mask_by[b] = r;  // b == s.rank: the group masked us
        s.state->mask_phase[b] = kPhaseMaskReport;
      }
    }
  }
}

}  // namespace jmep
