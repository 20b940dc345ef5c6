// Tiny kernels the proxy thread enqueues behind its copies, so they take
// effect in stream order (after the data they publish has landed).
#include <cstdint>

#include "channels/proxy.h"

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

}  // namespace

// With CUDA lazy loading, a kernel's first launch loads it and that waits for
// the device to idle, i.e. for the kernel spinning on this very proxy.
cudaError_t proxy_preload_kernels() {
  cudaFuncAttributes attr;
  cudaError_t e = cudaFuncGetAttributes(&attr, k_proxy_add);
  return e == cudaSuccess ? cudaFuncGetAttributes(&attr, k_proxy_store) : e;
}

cudaError_t proxy_launch_add(uint64_t* addr, int64_t delta, cudaStream_t s) {
  k_proxy_add<<<1, 1, 0, s>>>(addr, delta);
  return cudaGetLastError();
}

cudaError_t proxy_launch_store(uint64_t* addr, uint64_t value, cudaStream_t s) {
  k_proxy_store<<<1, 1, 0, s>>>(addr, value);
  return cudaGetLastError();
}

}  // namespace jmep
