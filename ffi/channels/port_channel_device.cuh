// Port channel (proxy): the kernel pushes a 32-byte trigger into a FIFO in
// host-mapped memory; the host proxy thread of this GPU pops triggers in
// order and performs them (copy-engine put into the peer's buffer, semaphore
// write, atomic add). Shaped after MSCCL++'s PortChannelDeviceHandle.
#pragma once
#include <cstdint>

#include "channels/channel_base.cuh"
#include "channels/fifo_types.h"

namespace jmep {

__device__ __forceinline__ uint64_t ld_volatile_u64(const uint64_t* p) {
  return *reinterpret_cast<const volatile uint64_t*>(p);
}

struct PortChannelDeviceHandle {
  FifoTrigger* slots;     // host-mapped ring (device pointer)
  uint64_t* head;         // device memory: next sequence number to claim
  uint64_t* tail_host;    // host-mapped: entries the proxy has retired
  uint64_t* tail_cache;   // device memory: last tail seen (avoids PCIe reads)
  uint64_t* poll_lock;    // device memory: 1 while some thread reads tail_host
  uint64_t* local_sem;    // my inbound semaphore for this peer (proxy of peer writes)
  uint64_t* expected;     // device memory: signals consumed so far
  ErrorRecord* error;     // for back-pressure timeouts of put/signal/atomicAdd
  int64_t timeout_ns;
  uint32_t fifo_size;
  int32_t rank;
  int32_t peer;
  int32_t pad;

  // Claims a slot, waits (bounded) for room, writes the entry. Returns the
  // sequence number, or ~0 if the FIFO stayed full past the timeout.
  __device__ uint64_t push(uint32_t type, uint64_t dst, uint64_t src, uint64_t size) {
    const uint64_t seq = ::atomicAdd(reinterpret_cast<unsigned long long*>(head), 1ull);
    uint64_t tail = ld_volatile_u64(tail_cache);
    uint64_t start = 0;
    bool waited = false;
    // The entry is written inside the loop, never after a branch join: lanes of
    // one warp that found room must not wait (at a reconvergence point) for
    // lanes still spinning on a full FIFO, or neither ever makes progress.
    while (true) {
      if (seq - tail < fifo_size) {
        FifoTrigger* t = slots + (seq % fifo_size);
        t->dst = dst;
        t->src = src;
        t->size = size;
        __threadfence_system();  // body before meta, and earlier writes before the trigger
        const uint64_t meta = ((seq + 1) << 24) | (static_cast<uint64_t>(peer) << 8) | type;
        asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(&t->meta), "l"(meta) : "memory");
        return seq;
      }
      if (!waited) {
        start = globaltimer_ns();
        waited = true;
      } else {
        __nanosleep(200);
      }
      // FIFO full: refresh from the device-side cache; only one waiting thread
      // at a time reads the host-mapped tail, so thousands of waiters do not
      // flood PCIe with reads (which starves the proxy's own launches/copies).
      tail = ld_volatile_u64(tail_cache);
      if (seq - tail >= fifo_size &&
          atomicCAS(reinterpret_cast<unsigned long long*>(poll_lock), 0ull, 1ull) == 0ull) {
        tail = ld_volatile_u64(tail_host);
        atomicMax(reinterpret_cast<unsigned long long*>(tail_cache), tail);
        atomicExch(reinterpret_cast<unsigned long long*>(poll_lock), 0ull);
      }
      if (timeout_ns > 0 && globaltimer_ns() - start > static_cast<uint64_t>(timeout_ns)) {
        record_error(error, kErrFifoTimeout, rank, peer, kPhaseProxyFlush, seq);
        return ~0ull;
      }
    }
  }

  __device__ void put(uint64_t dst_off, uint64_t src_off, uint64_t bytes) {
    push(kTrigPut, dst_off, src_off, bytes);
  }
  __device__ void putWithSignal(uint64_t dst_off, uint64_t src_off, uint64_t bytes) {
    push(kTrigPutSignal, dst_off, src_off, bytes);
  }
  __device__ void signal() { push(kTrigSignal, 0, 0, 0); }
  __device__ void atomicAdd(uint64_t dst_off, int64_t delta) {
    push(kTrigAdd, dst_off, static_cast<uint64_t>(delta), 0);
  }

  // Returns once every operation pushed before it (by anyone on this GPU) is
  // complete; false on timeout.
  __device__ bool flush(const WaitSite& site) {
    const uint64_t seq = push(kTrigFlush, 0, 0, 0);
    if (seq == ~0ull) return false;
    const uint64_t start = globaltimer_ns();
    while (ld_volatile_u64(tail_host) <= seq) {
      if (site.timeout_ns > 0 && globaltimer_ns() - start > static_cast<uint64_t>(site.timeout_ns)) {
        record_error(site.error, kErrFifoTimeout, site.rank, site.peer, site.phase, seq);
        return false;
      }
    }
    atomicMax(reinterpret_cast<unsigned long long*>(tail_cache), seq + 1);
    return true;
  }

  // One thread; consumes one signal (the peer's proxy writes the count).
  __device__ bool wait(const WaitSite& site) {
    const uint64_t target = *expected + 1;
    *expected = target;
    return wait_at_least(local_sem, target, site);
  }
};

}  // namespace jmep
