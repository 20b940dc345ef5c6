// The host proxy of one GPU: a thread that busy-polls the port-channel FIFO
// (host-mapped) and performs each trigger, in order, on its own high-priority
// stream: copy-engine puts into the peer's mapped buffer, semaphore writes
// (cuStreamWriteValue64, or a one-thread kernel where that is unavailable),
// signed atomic adds (one-thread kernel) and flushes (stream drain).
#pragma once
#include <cuda_runtime_api.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "channels/fifo_types.h"

namespace jmep {

struct ProxyPeer {
  char* remote = nullptr;             // peer's buffer as seen from my device
  uint64_t* remote_port_sem = nullptr;  // peer's inbound port semaphore for me
};

class Proxy {
 public:
  Proxy(int device, char* local, FifoTrigger* slots, uint64_t* tail, uint32_t fifo_size,
        std::vector<ProxyPeer> peers);
  ~Proxy();  // stops the thread and drains the stream
  std::string error();  // first failure seen by the thread ("" if none)
  bool failed() const { return failed_.load(std::memory_order_acquire); }

 private:
  void run();
  void fail(const std::string& what);
  void write_sem(uint64_t* addr, uint64_t value);

  int device_;
  char* local_;
  FifoTrigger* slots_;
  uint64_t* tail_;
  uint32_t fifo_size_;
  std::vector<ProxyPeer> peers_;
  std::vector<uint64_t> signals_sent_;
  cudaStream_t stream_ = nullptr;
  void* write_value_ = nullptr;  // cuStreamWriteValue64 driver entry point
  std::atomic<bool> stop_{false};
  std::atomic<bool> ready_{false};
  std::atomic<bool> failed_{false};
  std::mutex mu_;
  std::string error_;
  std::thread thread_;
};

// One-thread kernels the proxy launches on its stream (proxy_kernels.cu).
cudaError_t proxy_preload_kernels();
cudaError_t proxy_launch_add(uint64_t* addr, int64_t delta, cudaStream_t s);
cudaError_t proxy_launch_store(uint64_t* addr, uint64_t value, cudaStream_t s);

}  // namespace jmep
