// The seam between kernels and the channel layer: kernels include only this
// header. It pulls in the shared pieces (errors, timers, wait_at_least: see
// channel_base.cuh) and both handle kinds, and defines the per-peer handle
// with helpers that dispatch on its kind.
//
// Offsets are byte offsets into the *registered buffer* of the communicator
// (one symmetric buffer per rank, same size everywhere). The src offset is
// into this rank's buffer, the dst offset into the peer's.
#pragma once
#include <cstdint>

#include "channels/channel_base.cuh"
#include "channels/memory_channel_device.cuh"
#include "channels/port_channel_device.cuh"

namespace jmep {

enum ChannelKind : int32_t { kChanSelf = 0, kChanMemory = 1, kChanPort = 2 };

// One per peer, in device memory ([nranks], indexed by peer rank). For self
// only `mem.local` is meaningful (mem.remote == mem.local too).
struct ChannelDeviceHandle {
  int32_t kind;  // ChannelKind
  int32_t pad;
  MemoryChannelDeviceHandle mem;
  PortChannelDeviceHandle port;
};

// One thread each. Self: signals are not used; atomicAdd acts locally.
__device__ __forceinline__ void chan_signal(ChannelDeviceHandle& h) {
  if (h.kind == kChanMemory) h.mem.signal();
  else if (h.kind == kChanPort) h.port.signal();
}

__device__ __forceinline__ bool chan_wait(ChannelDeviceHandle& h, const WaitSite& site) {
  if (h.kind == kChanMemory) return h.mem.wait(site);
  if (h.kind == kChanPort) return h.port.wait(site);
  return true;
}

__device__ __forceinline__ void chan_atomic_add(ChannelDeviceHandle& h, uint64_t dst_off,
                                                int64_t delta) {
  if (h.kind == kChanPort) {
    h.port.atomicAdd(dst_off, delta);
  } else {
    h.mem.atomicAdd(dst_off, delta);  // self: mem.remote == local buffer
  }
}

__device__ __forceinline__ bool chan_flush(ChannelDeviceHandle& h, const WaitSite& site) {
  if (h.kind == kChanPort) return h.port.flush(site);
  return true;
}

// Called by every thread of one block (blockDim >= 1): thread p signals peer
// p, then waits for peer p's signal; returns true on every thread iff all
// waits succeeded. Threads past nranks loop over further peers.
__device__ __forceinline__ bool barrier_all(ChannelDeviceHandle* peers, int rank, int nranks,
                                            const WaitSite& site) {
  __syncthreads();  // the block's earlier writes precede the signals
  bool ok = true;
  for (int p = threadIdx.x; p < nranks; p += blockDim.x)
    if (p != rank) chan_signal(peers[p]);
  for (int p = threadIdx.x; p < nranks; p += blockDim.x) {
    if (p == rank) continue;
    WaitSite s = site;
    s.peer = p;
    ok = chan_wait(peers[p], s) && ok;
  }
  return __syncthreads_and(ok ? 1 : 0) != 0;
}

}  // namespace jmep
