// Device-side channel handles, shaped after MSCCL++'s port_channel_device.hpp
// and memory_channel_device.hpp: small, trivially copyable structs passed to
// kernels by value (or in device memory), with the same operation names and
// argument order (dst offset, src offset, bytes; signed int64 atomicAdd).
//
// Offsets are byte offsets into the *registered buffer* of the communicator
// (one symmetric buffer per rank, same size everywhere). The src offset is
// into this rank's buffer, the dst offset into the peer's.
//
// This file is the seam between the kernels and the channel layer: kernels
// include only this header. Implementation notes live next to each function.
#pragma once
#include <cstdint>

namespace jmep {

// Which part of an operation a wait belonged to (reported on timeout).
enum Phase : int32_t {
  kPhaseNone = 0,
  kPhaseTest = 1,
  kPhaseBarrier = 2,
  kPhaseDispatchSend = 3,
  kPhaseDispatchRecv = 4,
  kPhaseCombineSend = 5,
  kPhaseCombineRecv = 6,
  kPhaseProxyFlush = 7,
};

enum ErrorCode : int32_t {
  kErrOk = 0,
  kErrTimeout = 1,       // a wait outlived its timeout
  kErrBadExpert = 2,     // (counted, not fatal) expert id outside [-1, E)
  kErrFifoTimeout = 3,   // the proxy FIFO stayed full / flush never completed
};

// First error wins (code is claimed with atomicCAS). Lives in host-mapped
// pinned memory so the host can read it without synchronising the stream.
struct ErrorRecord {
  int32_t code;
  int32_t rank;
  int32_t peer;
  int32_t phase;
  uint64_t detail;  // e.g. value seen / value expected
};

__device__ __forceinline__ uint64_t globaltimer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ void record_error(ErrorRecord* rec, int32_t code, int32_t rank,
                                             int32_t peer, int32_t phase, uint64_t detail) {
  if (rec == nullptr) return;
  if (atomicCAS(reinterpret_cast<int*>(&rec->code), 0, code) == 0) {
    rec->rank = rank;
    rec->peer = peer;
    rec->phase = phase;
    rec->detail = detail;
    __threadfence_system();
  }
}

__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

// Where a failing wait is reported: who I am, the peer, and the phase.
struct WaitSite {
  ErrorRecord* error;
  int64_t timeout_ns;  // <= 0: wait forever (tests only)
  int32_t rank;
  int32_t peer;
  int32_t phase;
};

// Spin (one thread) until *sem >= target. Returns false on timeout, after
// recording the error. Any abort flag already set makes it return at once.
__device__ __forceinline__ bool wait_at_least(const uint64_t* sem, uint64_t target,
                                              const WaitSite& site) {
  if (ld_acquire_sys(sem) >= target) return true;
  const uint64_t start = globaltimer_ns();
  while (true) {
    if (ld_acquire_sys(sem) >= target) return true;
    if (site.error != nullptr && *reinterpret_cast<volatile int32_t*>(&site.error->code) == kErrTimeout)
      return false;  // someone else already timed out: give up promptly
    if (site.timeout_ns > 0 && globaltimer_ns() - start > static_cast<uint64_t>(site.timeout_ns)) {
      record_error(site.error, kErrTimeout, site.rank, site.peer, site.phase, ld_acquire_sys(sem));
      return false;
    }
  }
}

}  // namespace jmep
