// The host proxy of one GPU: a thread that busy-polls the port-channel FIFO
// (host-mapped) and performs each trigger, in order, through the connection
// of its peer (connection.h: CUDA IPC on this host, UCX to other hosts):
// puts, semaphore signals, signed atomic adds, flushes. Between triggers it
// progresses the UCX worker, if any (completions, held-back signals, signals
// arriving from peers) and turns a UCX endpoint failure into an error record
// that ends the kernels' waits at once.
#pragma once
#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "channels/connection.h"
#include "channels/error_record.h"
#include "channels/fifo_types.h"

namespace jmep {

class ProxyStream;
class UcxWorker;

struct ProxyPeer {
  Connection* conn = nullptr;  // null: no port channel to this peer
  uint64_t sem_off = 0;        // my port semaphore word in the peer's buffer
};

class Proxy {
 public:
  Proxy(ProxyStream* ps, FifoTrigger* slots, uint64_t* tail, uint32_t fifo_size,
        std::vector<ProxyPeer> peers, UcxWorker* ucx, ErrorRecord* err_host, int rank);
  ~Proxy();  // stops the thread and drains the stream
  std::string error();  // first failure seen by the thread ("" if none)
  bool failed() const { return failed_.load(std::memory_order_acquire); }
  // {triggers, ns} the thread spent performing triggers (pop to request posted),
  // for CUDA-IPC peers then UCX peers (flushes not counted).
  std::vector<uint64_t> stats() const;

 private:
  void run();
  void fail(const std::string& what, int peer);
  void perform(uint32_t type, uint32_t peer, uint64_t dst, uint64_t src, uint64_t size);

  ProxyStream* ps_;
  FifoTrigger* slots_;
  uint64_t* tail_;
  uint32_t fifo_size_;
  std::vector<ProxyPeer> peers_;
  std::vector<uint64_t> signals_sent_;
  std::vector<uint8_t> stat_;  // per peer: which stats slot its triggers count in (1: UCX)
  UcxWorker* ucx_;
  ErrorRecord* err_host_;
  int rank_;
  std::atomic<uint64_t> ops_[2] = {{0}, {0}}, ns_[2] = {{0}, {0}};
  std::atomic<bool> stop_{false};
  std::atomic<bool> ready_{false};
  std::atomic<bool> failed_{false};
  std::mutex mu_;
  std::string error_;
  std::thread thread_;
};

}  // namespace jmep
