// Memory channel (NVLink / P2P): the kernel itself stores into the peer's
// registered buffer, mapped into this GPU's address space (CUDA IPC across
// processes, plain peer pointer within one). Shaped after MSCCL++'s
// MemoryChannelDeviceHandle: put / signal / wait / atomicAdd / flush.
#pragma once
#include <cstdint>

#include "channels/channel_base.cuh"

namespace jmep {

// Release-ordered remote add (system scope): earlier writes of this thread are
// visible to whoever observes the add.
__device__ __forceinline__ void red_add_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

struct MemoryChannelDeviceHandle {
  char* local;          // my registered buffer
  char* remote;         // peer's registered buffer, mapped here
  uint64_t* remote_sem; // peer's inbound semaphore for me (in its memory)
  uint64_t* local_sem;  // my inbound semaphore for this peer (peer adds to it)
  uint64_t* expected;   // device memory: signals consumed so far (survives launches)

  __device__ void* remote_ptr(uint64_t off) const { return remote + off; }
  __device__ void* local_ptr(uint64_t off) const { return local + off; }

  // Cooperative copy local[src_off..] -> remote[dst_off..] by num_threads
  // threads (thread_id in [0, num_threads)). 16-byte vectors when src and dst
  // share alignment mod 16; otherwise aligned 4-byte stores built from bytes.
  __device__ void put(uint64_t dst_off, uint64_t src_off, uint64_t bytes, uint32_t thread_id,
                      uint32_t num_threads) {
    const char* s = local + src_off;
    char* d = remote + dst_off;
    const uint64_t sa = reinterpret_cast<uint64_t>(s), da = reinterpret_cast<uint64_t>(d);
    if (((sa ^ da) & 15) == 0) {
      uint64_t head = (16 - (da & 15)) & 15;
      if (head > bytes) head = bytes;
      for (uint64_t i = thread_id; i < head; i += num_threads) d[i] = s[i];
      const uint64_t nvec = (bytes - head) / 16;
      const int4* sv = reinterpret_cast<const int4*>(s + head);
      int4* dv = reinterpret_cast<int4*>(d + head);
      for (uint64_t i = thread_id; i < nvec; i += num_threads) dv[i] = sv[i];
      for (uint64_t i = head + nvec * 16 + thread_id; i < bytes; i += num_threads) d[i] = s[i];
      return;
    }
    // Mismatched alignment: each thread fills whole aligned 4-byte words of
    // the destination (remote stores stay word-sized; local loads are cheap).
    uint64_t head = (4 - (da & 3)) & 3;
    if (head > bytes) head = bytes;
    for (uint64_t i = thread_id; i < head; i += num_threads) d[i] = s[i];
    const uint64_t nw = (bytes - head) / 4;
    uint32_t* dw = reinterpret_cast<uint32_t*>(d + head);
    const unsigned char* sb = reinterpret_cast<const unsigned char*>(s + head);
    for (uint64_t i = thread_id; i < nw; i += num_threads) {
      const unsigned char* b = sb + 4 * i;
      dw[i] = uint32_t(b[0]) | (uint32_t(b[1]) << 8) | (uint32_t(b[2]) << 16) | (uint32_t(b[3]) << 24);
    }
    for (uint64_t i = head + nw * 4 + thread_id; i < bytes; i += num_threads) d[i] = s[i];
  }

  // One thread. The add is a system-scope release, which is cumulative in
  // the PTX memory model: the writes this thread (and, after the caller's
  // __syncthreads / __syncwarp, its block / warp) made are visible to the peer
  // once its acquire load sees the increment. No separate fence.sc.sys: it
  // would cost a round trip over NVLink on every signal.
  __device__ void signal() { red_add_release_sys(remote_sem, 1); }

  // One thread; consumes one signal. Acquire load in wait_at_least orders the
  // reader's later loads after the data.
  __device__ bool wait(const WaitSite& site) {
    const uint64_t target = *expected + 1;
    *expected = target;
    return wait_at_least(local_sem, target, site);
  }

  // One thread: signed add on an int64 word of the peer's buffer.
  __device__ void atomicAdd(uint64_t dst_off, int64_t delta) {
    __threadfence_system();
    red_add_release_sys(reinterpret_cast<uint64_t*>(remote + dst_off), static_cast<uint64_t>(delta));
  }

  __device__ void flush() {}
};

}  // namespace jmep
