// Proxy thread: see proxy.h.
#include "channels/proxy.h"

#include <cuda_runtime_api.h>

#include <chrono>
#include <cstring>
#include <stdexcept>

#include "channels/proxy_stream.h"
#include "channels/ucx_connection.h"

namespace jmep {
namespace {

inline uint64_t load_acquire(const uint64_t* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }

// First error wins, as on the device (the record is host-mapped).
void record_host_error(ErrorRecord* r, int32_t code, int32_t rank, int32_t peer, int32_t phase) {
  if (r == nullptr) return;
  int32_t expected = kErrOk;
  if (!__atomic_compare_exchange_n(&r->code, &expected, code, false, __ATOMIC_ACQ_REL,
                                   __ATOMIC_ACQUIRE))
    return;
  r->rank = rank;
  r->peer = peer;
  r->phase = phase;
  r->detail = 0;
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

}  // namespace

Proxy::Proxy(ProxyStream* ps, FifoTrigger* slots, uint64_t* tail, uint32_t fifo_size,
             std::vector<ProxyPeer> peers, UcxWorker* ucx, ErrorRecord* err_host, int rank)
    : ps_(ps), slots_(slots), tail_(tail), fifo_size_(fifo_size), peers_(std::move(peers)),
      signals_sent_(peers_.size(), 0), stat_(peers_.size(), 0), ucx_(ucx), err_host_(err_host),
      rank_(rank) {
  for (size_t p = 0; p < peers_.size(); ++p)
    stat_[p] = peers_[p].conn != nullptr && std::strcmp(peers_[p].conn->kind(), "ucx") == 0;
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

void Proxy::fail(const std::string& what, int peer) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (error_.empty())
      error_ = "port-channel proxy (rank " + std::to_string(rank_) + ", device " +
               std::to_string(ps_->device()) + "): " + what;
  }
  // Kernels waiting on that peer stop at once instead of running into their timeout.
  record_host_error(err_host_, kErrPeerLost, rank_, peer, kPhaseProxy);
  failed_.store(true, std::memory_order_release);
}

void Proxy::perform(uint32_t type, uint32_t peer, uint64_t dst, uint64_t src, uint64_t size) {
  if (type == kTrigFlush) {
    for (size_t p = 0; p < peers_.size(); ++p)
      if (peers_[p].conn != nullptr && !peers_[p].conn->flush())
        return fail(std::string(peers_[p].conn->kind()) + " flush: " + peers_[p].conn->error(),
                    static_cast<int>(p));
    return;
  }
  if (peer >= peers_.size() || peers_[peer].conn == nullptr)
    return fail("trigger for unknown peer " + std::to_string(peer), static_cast<int>(peer));
  Connection* c = peers_[peer].conn;
  const auto t0 = std::chrono::steady_clock::now();
  bool ok = true;
  if ((type == kTrigPut || type == kTrigPutSignal) && size > 0) ok = c->put(dst, src, size);
  if (ok && (type == kTrigSignal || type == kTrigPutSignal))
    ok = c->signal(peers_[peer].sem_off, ++signals_sent_[peer]);
  if (ok && type == kTrigAdd) ok = c->atomic_add(dst, static_cast<int64_t>(src));
  const int k = stat_[peer];
  ops_[k].fetch_add(1, std::memory_order_relaxed);
  ns_[k].fetch_add(std::chrono::duration_cast<std::chrono::nanoseconds>(
                       std::chrono::steady_clock::now() - t0).count(),
                   std::memory_order_relaxed);
  if (!ok) fail(std::string(c->kind()) + " operation towards peer " + std::to_string(peer) +
                    " failed: " + c->error(),
                static_cast<int>(peer));
}

std::vector<uint64_t> Proxy::stats() const {
  return {ops_[0].load(), ns_[0].load(), ops_[1].load(), ns_[1].load()};
}

void Proxy::run() {
  cudaError_t e = cudaSetDevice(ps_->device());
  if (e != cudaSuccess) fail(std::string("setup: ") + cudaGetErrorString(e), -1);
  ready_.store(true, std::memory_order_release);
  if (e != cudaSuccess) return;

  uint64_t tail = 0;
  uint32_t idle = 0;
  bool ucx_ok = true, ucx_loss_told = false;
  uint32_t loss_poll = 0;
  while (true) {
    if (ucx_ != nullptr && ucx_ok && ucx_->progress() < 0) {
      ucx_ok = false;  // endpoint error, or a request failed: report once, stop driving it
      fail("UCX: " + ucx_->error(), ucx_->failed_peer());
    } else if (ucx_ != nullptr && ucx_ok && !ucx_loss_told && ucx_->peer_isolation() &&
               ++loss_poll % 256 == 0 && ucx_->failed_peer() >= 0) {
      // Peer isolation: one peer is lost and the worker serves the others. Say so
      // once (the kernels then mask that peer) and keep driving UCX.
      ucx_loss_told = true;
      fail("UCX: " + ucx_->error(), ucx_->failed_peer());
    }
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
    perform(type, peer, t->dst, t->src, t->size);
    ++tail;
    __atomic_store_n(tail_, tail, __ATOMIC_RELEASE);
  }
  cudaStreamSynchronize(ps_->stream());
}

}  // namespace jmep
