// Test and benchmark kernels for the channel layer, launched from Python
// through the test-only module _ep_testing (testing/module.cc). All launches go on the communicator's own stream and
// return at once; sync() waits. Results land in the communicator's scratch
// words (scratch[0] = error count, scratch[1] = elapsed ns).
#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

#include "channels/channel_device.cuh"
#include "testing/channel_tests.h"
#include "channels/communicator.h"

namespace jmep {
namespace {

void ck(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("channel test: ") + what + ": " + cudaGetErrorString(e));
}

void preload_test_kernels();

struct Dev {
  int saved = -1;
  explicit Dev(int d) {
    cudaGetDevice(&saved);
    ck(cudaSetDevice(d), "cudaSetDevice");
    preload_test_kernels();
  }
  ~Dev() {
    if (saved >= 0) cudaSetDevice(saved);
  }
};

WaitSite site_of(Communicator& c, int peer, int phase) {
  return WaitSite{c.error_record_device(), c.timeout_ns(), c.rank(), peer, phase};
}

void check_peer(Communicator& c, int peer) {
  if (!c.connected()) throw std::runtime_error("communicator not connected");
  if (peer < 0 || peer >= c.nranks() || peer == c.rank())
    throw std::invalid_argument("peer must be another rank");
}

// ---- put: memory channel uses every block, port channel one trigger ------
__global__ void k_put(ChannelDeviceHandle* hs, int peer, uint64_t dst, uint64_t src,
                      uint64_t bytes, uint64_t chunk, int with_signal, int iters) {
  ChannelDeviceHandle& h = hs[peer];
  for (int it = 0; it < iters; ++it) {
    if (h.kind == kChanPort) {
      if (blockIdx.x == 0 && threadIdx.x == 0) {
        if (with_signal) h.port.putWithSignal(dst, src, bytes);
        else h.port.put(dst, src, bytes);
      }
      continue;
    }
    for (uint64_t b = blockIdx.x * chunk; b < bytes; b += gridDim.x * chunk) {
      const uint64_t n = bytes - b < chunk ? bytes - b : chunk;
      h.mem.put(dst + b, src + b, n, threadIdx.x, blockDim.x);
    }
  }
}

__global__ void k_signal(ChannelDeviceHandle* hs, int peer) { chan_signal(hs[peer]); }

__global__ void k_wait(ChannelDeviceHandle* hs, int peer, WaitSite site, uint64_t* scratch) {
  if (!chan_wait(hs[peer], site)) atomicAdd(reinterpret_cast<unsigned long long*>(scratch), 1ull);
}

__global__ void k_flush(ChannelDeviceHandle* hs, int peer, WaitSite site, uint64_t* scratch) {
  if (!chan_flush(hs[peer], site)) atomicAdd(reinterpret_cast<unsigned long long*>(scratch), 1ull);
}

// ---- ping-pong: one block; payload carries the round number -------------
__global__ void k_pingpong(ChannelDeviceHandle* hs, int peer, int rounds, int initiator,
                           uint64_t payload, uint64_t src_off, uint64_t dst_off, int check,
                           WaitSite site, uint64_t* scratch) {
  ChannelDeviceHandle& h = hs[peer];
  __shared__ int s_ok;
  uint64_t* out = reinterpret_cast<uint64_t*>(h.mem.local + src_off);
  const uint64_t* in = reinterpret_cast<const uint64_t*>(h.mem.local + dst_off);
  uint64_t bad = 0;
  if (threadIdx.x == 0) s_ok = 1;
  __syncthreads();
  const uint64_t t0 = globaltimer_ns();
  for (int r = 1; r <= rounds; ++r) {
    for (int phase = 0; phase < 2; ++phase) {
      const bool sending = (phase == 0) == (initiator != 0);
      if (sending) {
        if (check && threadIdx.x == 0) *out = static_cast<uint64_t>(r);
        __syncthreads();
        if (h.kind == kChanPort) {
          if (threadIdx.x == 0) {
            if (payload > 0) h.port.putWithSignal(dst_off, src_off, payload);
            else h.port.signal();
          }
        } else {
          h.mem.put(dst_off, src_off, payload, threadIdx.x, blockDim.x);
          __syncthreads();
          if (threadIdx.x == 0) h.mem.signal();
        }
      } else {
        if (threadIdx.x == 0) {
          if (!chan_wait(h, site)) s_ok = 0;
          else if (check && *reinterpret_cast<const volatile uint64_t*>(in) != static_cast<uint64_t>(r))
            ++bad;
        }
        __syncthreads();
        if (!s_ok) break;
      }
    }
    if (!s_ok) break;
  }
  if (threadIdx.x == 0) {
    scratch[1] = globaltimer_ns() - t0;
    scratch[0] += bad + (s_ok ? 0 : 1);
  }
}

// ---- atomics: many warps/blocks add signed deltas to one int64 ----------
__device__ __forceinline__ int64_t test_delta(uint64_t i) {
  return static_cast<int64_t>((i * 7919ull) % 2001ull) - 1000;
}

__global__ void k_atomic(ChannelDeviceHandle* hs, int peer, uint64_t dst_off, int per_thread) {
  const uint64_t gid = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x;
  if (!per_thread && (threadIdx.x & 31) != 0) return;
  chan_atomic_add(hs[peer], dst_off, test_delta(gid));
}

// ---- barrier: one block, all peers ---------------------------------------
__global__ void k_barrier(ChannelDeviceHandle* hs, int rank, int nranks, int iters, WaitSite site,
                          uint64_t* scratch) {
  const uint64_t t0 = globaltimer_ns();
  for (int i = 0; i < iters; ++i)
    if (!barrier_all(hs, rank, nranks, site)) {
      if (threadIdx.x == 0) scratch[0] += 1;
      break;
    }
  if (threadIdx.x == 0) scratch[1] = globaltimer_ns() - t0;
}

// With CUDA lazy loading a kernel's first launch waits for the device to idle;
// next to a peer's kernel spinning on this rank that never happens. So every
// test kernel is loaded (on the current device) before the first launch.
void preload_test_kernels() {
  static thread_local uint64_t done = 0;  // bit per device ordinal
  int d = 0;
  cudaGetDevice(&d);
  if (d < 64 && (done >> d & 1)) return;
  cudaFuncAttributes a;
  const void* fns[] = {reinterpret_cast<const void*>(k_put), reinterpret_cast<const void*>(k_signal),
                       reinterpret_cast<const void*>(k_wait), reinterpret_cast<const void*>(k_flush),
                       reinterpret_cast<const void*>(k_pingpong), reinterpret_cast<const void*>(k_atomic),
                       reinterpret_cast<const void*>(k_barrier)};
  for (const void* f : fns) ck(cudaFuncGetAttributes(&a, f), "load test kernel");
  if (d < 64) done |= uint64_t(1) << d;
}

}  // namespace

void test_put(Communicator& c, int peer, uint64_t dst, uint64_t src, uint64_t bytes, bool signal,
              int blocks, int threads, int iters) {
  check_peer(c, peer);
  if (src + bytes > c.buffer_bytes() || dst + bytes > c.buffer_bytes())
    throw std::out_of_range("put outside the registered buffer");
  Dev g(c.device());
  const uint64_t chunk = blocks > 0 ? ((bytes + blocks - 1) / blocks + 15) / 16 * 16 : bytes;
  k_put<<<blocks, threads, 0, c.stream()>>>(c.device_handles(), peer, dst, src, bytes,
                                             chunk > 0 ? chunk : 16, 0, iters);
  ck(cudaGetLastError(), "put launch");
  if (signal) {
    k_signal<<<1, 1, 0, c.stream()>>>(c.device_handles(), peer);
    ck(cudaGetLastError(), "signal launch");
  }
}

void test_signal(Communicator& c, int peer) {
  check_peer(c, peer);
  Dev g(c.device());
  k_signal<<<1, 1, 0, c.stream()>>>(c.device_handles(), peer);
  ck(cudaGetLastError(), "signal launch");
}

void test_wait(Communicator& c, int peer) {
  check_peer(c, peer);
  Dev g(c.device());
  k_wait<<<1, 1, 0, c.stream()>>>(c.device_handles(), peer, site_of(c, peer, kPhaseTest),
                                  c.scratch());
  ck(cudaGetLastError(), "wait launch");
}

void test_flush(Communicator& c, int peer) {
  check_peer(c, peer);
  Dev g(c.device());
  k_flush<<<1, 1, 0, c.stream()>>>(c.device_handles(), peer, site_of(c, peer, kPhaseProxyFlush),
                                   c.scratch());
  ck(cudaGetLastError(), "flush launch");
}

void test_pingpong(Communicator& c, int peer, int rounds, bool initiator, uint64_t payload,
                   uint64_t src_off, uint64_t dst_off, bool check, int threads) {
  check_peer(c, peer);
  if (check && payload < 8) payload = 8;
  if (src_off + payload > c.buffer_bytes() || dst_off + payload > c.buffer_bytes())
    throw std::out_of_range("ping-pong outside the registered buffer");
  Dev g(c.device());
  k_pingpong<<<1, threads, 0, c.stream()>>>(c.device_handles(), peer, rounds, initiator ? 1 : 0,
                                            payload, src_off, dst_off, check ? 1 : 0,
                                            site_of(c, peer, kPhaseTest), c.scratch());
  ck(cudaGetLastError(), "ping-pong launch");
}

void test_atomic(Communicator& c, int peer, uint64_t dst_off, int blocks, int threads,
                 bool per_thread) {
  check_peer(c, peer);
  if (dst_off % 8 || dst_off + 8 > c.buffer_bytes())
    throw std::invalid_argument("atomic offset must be 8-byte aligned inside the buffer");
  Dev g(c.device());
  k_atomic<<<blocks, threads, 0, c.stream()>>>(c.device_handles(), peer, dst_off, per_thread ? 1 : 0);
  ck(cudaGetLastError(), "atomic launch");
}

void test_barrier(Communicator& c, int iters) {
  if (!c.connected()) throw std::runtime_error("communicator not connected");
  Dev g(c.device());
  const int threads = c.nranks() < 32 ? 32 : (c.nranks() + 31) / 32 * 32;
  k_barrier<<<1, threads, 0, c.stream()>>>(c.device_handles(), c.rank(), c.nranks(), iters,
                                           site_of(c, -1, kPhaseBarrier), c.scratch());
  ck(cudaGetLastError(), "barrier launch");
}

double bench_put(Communicator& c, int peer, uint64_t bytes, int iters, int blocks, int threads) {
  check_peer(c, peer);
  Dev g(c.device());
  cudaEvent_t a, b;
  ck(cudaEventCreate(&a), "event");
  ck(cudaEventCreate(&b), "event");
  test_put(c, peer, 0, 0, bytes, false, blocks, threads, 1);  // warm-up
  if (c.channel_kind(peer) == 2) test_flush(c, peer);
  cudaEventRecord(a, c.stream());
  test_put(c, peer, 0, 0, bytes, false, blocks, threads, iters);
  if (c.channel_kind(peer) == 2) test_flush(c, peer);
  cudaEventRecord(b, c.stream());
  ck(cudaEventSynchronize(b), "bench put");
  float ms = 0;
  cudaEventElapsedTime(&ms, a, b);
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return ms * 1e-3 / iters;
}

double bench_peer_copy(Communicator& c, int peer, uint64_t bytes, int iters) {
  check_peer(c, peer);
  Dev g(c.device());
  cudaEvent_t a, b;
  ck(cudaEventCreate(&a), "event");
  ck(cudaEventCreate(&b), "event");
  char* dst = c.peer_buffer(peer);
  const int pdev = c.peer_device(peer);
  ck(cudaMemcpyPeerAsync(dst, pdev, c.buffer(), c.device(), bytes, c.stream()), "peer copy");
  cudaEventRecord(a, c.stream());
  for (int i = 0; i < iters; ++i)
    ck(cudaMemcpyPeerAsync(dst, pdev, c.buffer(), c.device(), bytes, c.stream()), "peer copy");
  cudaEventRecord(b, c.stream());
  ck(cudaEventSynchronize(b), "bench peer copy");
  float ms = 0;
  cudaEventElapsedTime(&ms, a, b);
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return ms * 1e-3 / iters;
}

}  // namespace jmep
