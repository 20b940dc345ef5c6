// The proxy's CUDA stream and the small device writes it enqueues behind its
// copies (so they take effect in stream order, after the data they publish):
// semaphore stores (cuStreamWriteValue64, else a one-thread kernel), signed
// adds and monotone stores (one-thread kernels). Created by the Communicator,
// shared by the proxy thread and the connections it drives.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace jmep {

class ProxyStream {
 public:
  explicit ProxyStream(int device);  // high-priority non-blocking stream on `device`
  ~ProxyStream();
  ProxyStream(const ProxyStream&) = delete;
  ProxyStream& operator=(const ProxyStream&) = delete;

  int device() const { return device_; }
  cudaStream_t stream() const { return stream_; }
  cudaError_t store(uint64_t* addr, uint64_t value);   // after everything enqueued before
  cudaError_t add(uint64_t* addr, int64_t delta);
  cudaError_t store_max(uint64_t* addr, uint64_t value);  // *addr = max(*addr, value)

 private:
  int device_;
  cudaStream_t stream_ = nullptr;
  void* write_value_ = nullptr;  // cuStreamWriteValue64 driver entry point, if any
};

// One-thread kernels (proxy_kernels.cu).
cudaError_t proxy_preload_kernels();
cudaError_t proxy_launch_add(uint64_t* addr, int64_t delta, cudaStream_t s);
cudaError_t proxy_launch_store(uint64_t* addr, uint64_t value, cudaStream_t s);
cudaError_t proxy_launch_max(uint64_t* addr, uint64_t value, cudaStream_t s);

}  // namespace jmep
