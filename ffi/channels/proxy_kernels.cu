// Tiny kernels the proxy enqueues behind its copies, so they take effect in
// stream order (after the data they publish has landed). Each fences at
// system scope first: the copies before it (and, for signals that arrived
// over the network, the bytes the transport already wrote) are visible to any
// kernel that observes the word.
#include <cstdint>

#include "channels/proxy_stream.h"

namespace jmep {
namespace {

__global__ void k_proxy_add(uint64_t* addr, int64_t delta) {
  __threadfence_system();
  atomicAdd(reinterpret_cast<unsigned long long*>(addr), static_cast<unsigned long long>(delta));
}

__global__ void k_proxy_store(uint64_t* addr, uint64_t value) {
  __threadfence_system();
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(addr), "l"(value) : "memory");
}

__global__ void k_proxy_max(uint64_t* addr, uint64_t value) {
  __threadfence_system();
  atomicMax(reinterpret_cast<unsigned long long*>(addr), static_cast<unsigned long long>(value));
}

}  // namespace

cudaError_t proxy_preload_kernels() {
  cudaFuncAttributes attr;
  cudaError_t e = cudaFuncGetAttributes(&attr, k_proxy_add);
  if (e == cudaSuccess) e = cudaFuncGetAttributes(&attr, k_proxy_store);
  return e == cudaSuccess ? cudaFuncGetAttributes(&attr, k_proxy_max) : e;
}

cudaError_t proxy_launch_add(uint64_t* addr, int64_t delta, cudaStream_t s) {
  k_proxy_add<<<1, 1, 0, s>>>(addr, delta);
  return cudaGetLastError();
}

cudaError_t proxy_launch_store(uint64_t* addr, uint64_t value, cudaStream_t s) {
  k_proxy_store<<<1, 1, 0, s>>>(addr, value);
  return cudaGetLastError();
}

cudaError_t proxy_launch_max(uint64_t* addr, uint64_t value, cudaStream_t s) {
  k_proxy_max<<<1, 1, 0, s>>>(addr, value);
  return cudaGetLastError();
}

}  // namespace jmep
