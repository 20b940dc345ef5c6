// Proxy stream: see proxy_stream.h.
#include "channels/proxy_stream.h"

#include <stdexcept>
#include <string>

namespace jmep {
namespace {

// cuStreamWriteValue64's signature, without including cuda.h's types.
using WriteValue64Fn = int (*)(cudaStream_t, unsigned long long, unsigned long long, unsigned int);

void ck(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("jax_mscclpp_ep proxy stream: ") + what + ": " +
                             cudaGetErrorString(e));
}

}  // namespace

ProxyStream::ProxyStream(int device) : device_(device) {
  int saved = 0;
  ck(cudaGetDevice(&saved), "cudaGetDevice");
  ck(cudaSetDevice(device), "cudaSetDevice");
  int lo = 0, hi = 0;
  cudaError_t e = cudaDeviceGetStreamPriorityRange(&lo, &hi);
  if (e == cudaSuccess) e = cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking, hi);
  // With CUDA lazy loading, a kernel's first launch loads it and that waits
  // for the device to idle, i.e. for the kernel spinning on this very proxy.
  if (e == cudaSuccess) e = proxy_preload_kernels();
  cudaDriverEntryPointQueryResult q;
  if (e == cudaSuccess &&
      (cudaGetDriverEntryPointByVersion("cuStreamWriteValue64", &write_value_, 12000,
                                        cudaEnableDefault, &q) != cudaSuccess ||
       q != cudaDriverEntryPointSuccess))
    write_value_ = nullptr;
  cudaGetLastError();
  cudaSetDevice(saved);
  ck(e, "setup");
}

ProxyStream::~ProxyStream() {
  if (stream_ == nullptr) return;
  int saved = 0;
  cudaGetDevice(&saved);
  cudaSetDevice(device_);
  cudaStreamSynchronize(stream_);
  cudaStreamDestroy(stream_);
  cudaSetDevice(saved);
}

cudaError_t ProxyStream::store(uint64_t* addr, uint64_t value) {
  if (write_value_ != nullptr) {
    // Default flags: the write is preceded by a memory barrier.
    int rc = reinterpret_cast<WriteValue64Fn>(write_value_)(
        stream_, reinterpret_cast<unsigned long long>(addr), value, 0);
    if (rc == 0) return cudaSuccess;
    write_value_ = nullptr;  // unsupported here: fall back to a kernel from now on
  }
  return proxy_launch_store(addr, value, stream_);
}

cudaError_t ProxyStream::add(uint64_t* addr, int64_t delta) {
  return proxy_launch_add(addr, delta, stream_);
}

cudaError_t ProxyStream::store_max(uint64_t* addr, uint64_t value) {
  return proxy_launch_max(addr, value, stream_);
}

}  // namespace jmep
