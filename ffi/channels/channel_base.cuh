// Shared device-side pieces of the channel layer (errors, timers, waits).
// Channel handles are shaped after MSCCL++'s port_channel_device.hpp
// and memory_channel_device.hpp: small, trivially copyable structs passed to
// kernels by value (or in device memory), with the same operation names and
// argument order (dst offset, src offset, bytes; signed int64 atomicAdd).
//
// Offsets are byte offsets into the *registered buffer* of the communicator
// (one symmetric buffer per rank, same size everywhere). The src offset is
// into this rank's buffer, the dst offset into the peer's.
// Kernels include channel_device.cuh, which includes this.
#pragma once
#include <cstdint>

#include "channels/error_record.h"

namespace jmep {

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

// Spin (one thread) until *sem >= target. Returns false on timeout, after
// recording the error. Any timeout already recorded (by any wait) makes it
// return promptly. The tight loop only reads the semaphore (device memory);
// the clock and the host-mapped error record are looked at every 256 polls,
// so a PCIe read never sits between a signal's arrival and its detection.
__device__ __forceinline__ bool wait_at_least(const uint64_t* sem, uint64_t target,
                                              const WaitSite& site) {
  if (ld_acquire_sys(sem) >= target) return true;
  const uint64_t start = globaltimer_ns();
  while (true) {
    for (int i = 0; i < 256; ++i)
      if (ld_acquire_sys(sem) >= target) return true;
    if (site.error != nullptr &&
        error_aborts_waits(*reinterpret_cast<volatile int32_t*>(&site.error->code)))
      return false;  // someone else already timed out: give up promptly
    if (site.timeout_ns > 0 && globaltimer_ns() - start > static_cast<uint64_t>(site.timeout_ns)) {
      record_error(site.error, kErrTimeout, site.rank, site.peer, site.phase, ld_acquire_sys(sem));
      return false;
    }
  }
}

}  // namespace jmep
