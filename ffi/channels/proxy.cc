// Proxy thread: see proxy.h.
#include "channels/proxy.h"

#include <stdexcept>

namespace jmep {
namespace {

// cuStreamWriteValue64's signature, without including cuda.h's types.
using WriteValue64Fn = int (*)(cudaStream_t, unsigned long long, unsigned long long, unsigned int);

inline uint64_t load_acquire(const uint64_t* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }

}  // namespace

Proxy::Proxy(int device, char* local, FifoTrigger* slots, uint64_t* tail, uint32_t fifo_size,
             std::vector<ProxyPeer> peers)
    : device_(device), local_(local), slots_(slots), tail_(tail), fifo_size_(fifo_size),
      peers_(std::move(peers)), signals_sent_(peers_.size(), 0) {
  thread_ = std::thread([this] { run(); });
  while (!ready_.load(std::memory_order_acquire)) std::this_thread::yield();
  std::string e = error();
  if (!e.empty()) {
    stop_ = true;
    thread_.join();
    throw std::runtime_error(e);
  }
}

Proxy::~Proxy() {
  stop_.store(true, std::memory_order_release);
  if (thread_.joinable()) thread_.join();
}

std::string Proxy::error() {
  std::lock_guard<std::mutex> lock(mu_);
  return error_;
}

void Proxy::fail(const std::string& what) {
  std::lock_guard<std::mutex> lock(mu_);
  if (error_.empty()) error_ = "port-channel proxy (device " + std::to_string(device_) + "): " + what;
  failed_.store(true, std::memory_order_release);
}

void Proxy::write_sem(uint64_t* addr, uint64_t value) {
  if (write_value_ != nullptr) {
    // Default flags: the write is preceded by a memory barrier.
    int rc = reinterpret_cast<WriteValue64Fn>(write_value_)(
        stream_, reinterpret_cast<unsigned long long>(addr), value, 0);
    if (rc == 0) return;
    write_value_ = nullptr;  // unsupported here: fall back to a kernel from now on
  }
  cudaError_t e = proxy_launch_store(addr, value, stream_);
  if (e != cudaSuccess) fail(std::string("semaphore write: ") + cudaGetErrorString(e));
}

void Proxy::run() {
  cudaError_t e = cudaSetDevice(device_);
  int lo = 0, hi = 0;
  if (e == cudaSuccess) e = cudaDeviceGetStreamPriorityRange(&lo, &hi);
  if (e == cudaSuccess) e = cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking, hi);
  if (e == cudaSuccess) e = proxy_preload_kernels();
  if (e != cudaSuccess) {
    fail(std::string("setup: ") + cudaGetErrorString(e));
    ready_.store(true, std::memory_order_release);
    return;
  }
  cudaDriverEntryPointQueryResult q;
  if (cudaGetDriverEntryPointByVersion("cuStreamWriteValue64", &write_value_, 12000,
                                       cudaEnableDefault, &q) != cudaSuccess ||
      q != cudaDriverEntryPointSuccess)
    write_value_ = nullptr;
  cudaGetLastError();
  ready_.store(true, std::memory_order_release);

  uint64_t tail = 0;
  uint32_t idle = 0;
  while (true) {
    FifoTrigger* t = slots_ + (tail % fifo_size_);
    const uint64_t meta = load_acquire(&t->meta);
    if ((meta >> 24) != tail + 1) {
      // Busy-poll for latency; look at the stop flag now and then.
      if (++idle >= 1024) {
        idle = 0;
        if (stop_.load(std::memory_order_acquire)) break;
      }
      continue;
    }
    idle = 0;
    const uint32_t type = static_cast<uint32_t>(meta & 0xff);
    const uint32_t peer = static_cast<uint32_t>((meta >> 8) & 0xffff);
    const uint64_t dst = t->dst, src = t->src, size = t->size;
    if (peer >= peers_.size() || (type != kTrigFlush && peers_[peer].remote == nullptr)) {
      fail("trigger for unknown peer " + std::to_string(peer));
    } else {
      const ProxyPeer& p = peers_[peer];
      cudaError_t err = cudaSuccess;
      if ((type == kTrigPut || type == kTrigPutSignal) && size > 0)
        err = cudaMemcpyAsync(p.remote + dst, local_ + src, size, cudaMemcpyDefault, stream_);
      if (err == cudaSuccess && (type == kTrigSignal || type == kTrigPutSignal))
        write_sem(p.remote_port_sem, ++signals_sent_[peer]);
      if (err == cudaSuccess && type == kTrigAdd)
        err = proxy_launch_add(reinterpret_cast<uint64_t*>(p.remote + dst),
                               static_cast<int64_t>(src), stream_);
      if (err == cudaSuccess && type == kTrigFlush) err = cudaStreamSynchronize(stream_);
      if (err != cudaSuccess) fail(std::string("operation failed: ") + cudaGetErrorString(err));
    }
    ++tail;
    __atomic_store_n(tail_, tail, __ATOMIC_RELEASE);
  }
  cudaStreamSynchronize(stream_);
  cudaStreamDestroy(stream_);
}

}  // namespace jmep
