// Host side of one rank (one GPU): the registered buffer, the peers' mapped
// buffers, the device channel handles, the error record and the port-channel
// proxy with a connection per port peer. Built in steps so that Python can
// move the exchanged bytes (through JAX's key-value store, or in process):
//   Communicator c(rank, nranks, device, bytes, force_port, timeout_ns, fifo, host_id);
//   c.enable_ucx(lib_path, mode);         // only if some peer is on another host
//   std::string mine = c.local_info();   // give to every peer
//   c.connect(all_infos);                 // infos[r] from rank r
// Topology: a peer whose host identity differs from ours is reached through a
// UCX port channel; a peer on this host through a memory channel (NVLink/P2P,
// CUDA IPC) or, forced or without P2P, a CUDA-IPC port channel.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "channels/error_record.h"

namespace jmep {

struct ChannelDeviceHandle;
class Connection;
class Proxy;
class ProxyStream;
class UcxWorker;

// Bytes at the end of the registered allocation (past buffer_bytes) that hold
// the inbound semaphores: [memory sems: nranks][port sems: nranks], indexed by
// the sending rank.
inline size_t sem_area_bytes(int nranks) { return static_cast<size_t>(nranks) * 16 + 256; }

class Communicator {
 public:
  // host_id: this rank's host identity ("" = hostname + boot id).
  Communicator(int rank, int nranks, int device, size_t buffer_bytes, bool force_port,
               int64_t timeout_ns, int fifo_size = 1024, const std::string& host_id = "");
  ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  // Registers the whole allocation with UCX (lib_path: libjmep_ucx.so;
  // signal_mode: 0 UCX atomics, 1 active messages). Before local_info().
  void enable_ucx(const std::string& lib_path, int signal_mode);
  bool ucx_enabled() const { return ucx_ != nullptr; }
  // A UCX peer that fails loses only itself (on_peer_failure="mask"); no-op without UCX.
  void set_ucx_peer_isolation(bool on);
  const std::string& host_id() const { return host_id_; }
  // How the proxy reaches `peer` ("self", "memory", "cuda-ipc", or the UCX
  // endpoint's transports).
  std::string describe_peer(int peer) const;

  std::string local_info() const;
  void connect(const std::vector<std::string>& infos);
  void close();  // idempotent; also run by the destructor

  int rank() const { return rank_; }
  int nranks() const { return nranks_; }
  int device() const { return device_; }
  char* buffer() const { return buffer_; }
  size_t buffer_bytes() const { return buffer_bytes_; }
  int channel_kind(int peer) const { return kinds_.at(peer); }
  bool connected() const { return connected_; }
  bool closed() const { return closed_; }
  ChannelDeviceHandle* device_handles() const { return handles_dev_; }
  ErrorRecord* error_record() const { return err_host_; }
  ErrorRecord* error_record_device() const { return err_dev_; }
  int64_t timeout_ns() const { return timeout_ns_; }
  cudaStream_t stream() const { return stream_; }  // for test/bench launches
  // Device words that production code may write (the LL registration's proxy
  // kernel warm-up), apart from the test kernels' scratch (_ep_testing).
  static constexpr int kWarmupWords = 3, kScratchWords = 64;
  uint64_t* warmup_words() const { return warmup_; }
  uint64_t* scratch() const { return scratch_; }
  char* peer_buffer(int peer) const { return peer_bufs_.at(peer); }
  int peer_device(int peer) const { return peer_devs_.at(peer); }

  // Throws std::runtime_error naming rank/peer/phase if a kernel or the
  // proxy recorded an error, then resets the record.
  void check_error();
  // The proxy thread's first failure ("" if none); proxy_failed() is cheap.
  std::string proxy_error() const;
  std::vector<uint64_t> proxy_stats() const;  // Proxy::stats(), zeros before connect
  bool proxy_failed() const;

 private:
  void fail_if_closed() const;

  int rank_, nranks_, device_;
  size_t buffer_bytes_;
  bool force_port_;
  int64_t timeout_ns_;
  int fifo_size_;
  bool connected_ = false, closed_ = false;

  char* buffer_ = nullptr;           // registered allocation (+ semaphore area)
  uint64_t* state_ = nullptr;        // device counters (expected, fifo head, tail cache, scratch)
  uint64_t* warmup_ = nullptr;
  uint64_t* scratch_ = nullptr;
  ErrorRecord* err_host_ = nullptr;  // host-mapped
  ErrorRecord* err_dev_ = nullptr;
  void* fifo_host_ = nullptr;        // host-mapped: [tail (256 B)][slots]
  ChannelDeviceHandle* handles_dev_ = nullptr;
  cudaStream_t stream_ = nullptr;
  std::vector<int> kinds_;
  std::vector<char*> peer_bufs_;     // peer's buffer as seen from my device
  std::vector<int> peer_devs_;       // peer's device ordinal in this process
  std::vector<bool> ipc_opened_;
  std::string host_id_;
  size_t alloc_bytes_ = 0;                  // buffer + semaphore area
  std::unique_ptr<ProxyStream> pstream_;
  std::unique_ptr<UcxWorker> ucx_;
  std::vector<std::unique_ptr<Connection>> conns_;  // [nranks]; null: no port channel
  std::unique_ptr<Proxy> proxy_;
};

}  // namespace jmep
