// How the LL kernels reach a peer: the only place that touches the channel
// layer's device handles. Memory channels (and self) give a plain pointer to
// the peer's registered buffer, so kernels store 16-byte vectors straight over
// NVLink; port channels take (dst offset, src offset, bytes) triggers that the
// host proxy executes, so the data must first sit in our own registered buffer.
#pragma once
#include <cstdint>

#include "channels/channel_device.cuh"
#include "channels/memory_channel_device.cuh"
#include "channels/port_channel_device.cuh"

namespace jmep {

enum LlPeerKind : int32_t { kLlSelf = 0, kLlMemory = 1, kLlPort = 2 };

// Resolved once at registration (ll_peers_init) and kept in device memory.
struct LlPeer {
  char* base;     // peer's registered buffer as seen from this GPU; null for port peers
  int32_t kind;   // LlPeerKind
  int32_t pad;
};

// Port-channel operations (one thread each, in push order per channel). Out of
// line: each is a FIFO push with back-pressure and timeout handling, far more
// code than the direct path it sits beside, and the LL kernels' fixed cost is
// largely instruction fetch (issue 14), so a memory peer's path should not
// carry it. A call costs nothing next to the proxy's microseconds.
static __device__ __noinline__ void ll_port_put(ChannelDeviceHandle* h, int peer, uint64_t dst,
                                            uint64_t src, uint64_t bytes) {
  h[peer].port.put(dst, src, bytes);
}
static __device__ __noinline__ void ll_port_add(ChannelDeviceHandle* h, int peer, uint64_t dst,
                                            int64_t delta) {
  h[peer].port.atomicAdd(dst, delta);
}

// Signed add on a signal word we can address directly (self or NVLink peer),
// as a system-scope release. Release is cumulative in the PTX memory model:
// every write this thread has observed (its block's, after a __syncthreads;
// other blocks', after an acquire of their release-add) is visible to a peer
// whose acquire load sees the add. Cheaper than fence.sc.sys + a relaxed add.
__device__ __forceinline__ void ll_direct_add(char* base, int64_t off, int64_t delta) {
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(base + off),
               "l"(static_cast<uint64_t>(delta)) : "memory");
}

// Add on a counter that other blocks of this kernel acquire (gpu scope): the
// adding thread's observed writes (e.g. its block's stores, to any GPU) come first.
__device__ __forceinline__ void ll_release_add_gpu(int32_t* p, int32_t v) {
  asm volatile("red.release.gpu.global.add.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// True (after recording a timeout) once a wait that began at `start` should
// give up: another wait already failed, or this one outlived the timeout.
// The error record is host-mapped, so callers poll it only every few
// thousand spins: reading it on every spin floods PCIe (and the port
// channels' FIFO shares that link). Out of line: it runs once per
// kLlPollEvery spins, and every wait site would otherwise carry a copy.
static __device__ __noinline__ bool ll_wait_expired(uint64_t start, int64_t seen, const WaitSite& site) {
  if (site.error != nullptr &&
      error_aborts_waits(*reinterpret_cast<volatile int32_t*>(&site.error->code)))
    return true;
  if (site.timeout_ns > 0 && globaltimer_ns() - start > static_cast<uint64_t>(site.timeout_ns)) {
    record_error(site.error, kErrTimeout, site.rank, site.peer, site.phase,
                 static_cast<uint64_t>(seen));
    return true;
  }
  return false;
}

constexpr uint32_t kLlPollEvery = 4096;  // spins between timeout / abort checks

// Spin on a local signal word until pred(value) holds; every kLlPollEvery
// spins ask expired(start, value) whether to give up. Returns the value seen,
// or 0 when given up.
template <typename Pred, typename Expired>
__device__ __forceinline__ int64_t ll_spin(const char* p, Pred pred, Expired expired) {
  const uint64_t* w = reinterpret_cast<const uint64_t*>(p);
  int64_t v = static_cast<int64_t>(ld_acquire_sys(w));
  if (pred(v)) return v;
  const uint64_t start = globaltimer_ns();
  for (uint32_t it = 1;; ++it) {
    v = static_cast<int64_t>(ld_acquire_sys(w));
    if (pred(v)) return v;
    if (it % kLlPollEvery == 0 && expired(start, v)) return 0;
  }
}

// ll_spin with the error record's timeout (0 on timeout, with the error recorded).
template <typename Pred>
__device__ __forceinline__ int64_t ll_wait_signal(const char* p, Pred pred, const WaitSite& site) {
  return ll_spin(p, pred, [&](uint64_t start, int64_t v) { return ll_wait_expired(start, v, site); });
}

}  // namespace jmep
