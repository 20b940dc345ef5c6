// A peer on another host, reached through UCX (libjmep_ucx.so, see
// ffi/ucx/jmep_ucx.h), which this module loads with dlopen only when such a
// peer exists: single-host jobs never load UCX.
//
// One UcxWorker per communicator registers the whole registered allocation
// (buffer + semaphore area) and holds an endpoint per remote peer; the proxy
// thread progresses it between triggers. A UcxConnection is one peer of it.
//
// Ordering: the library holds each signal/add back until a flush of the
// endpoint, started after the data, has completed at the target (UCX's
// remote completion: the bytes are in the peer's memory). Then:
//  - signals as active messages (default; any transport, TCP included): the
//    peer's proxy applies them with a one-thread kernel on its own stream,
//    issued after it saw the flush-ordered message, so its kernels that
//    acquire the word also see the data;
//  - signals as UCX atomics/puts (JMEP_UCX_SIGNALS=rma; InfiniBand with
//    GPUDirect RDMA): the NIC writes the word after the data has completed.
// Semaphore stores are applied as max(), so a late store can never lower a
// count a waiter already saw.
#pragma once
#include <cstdint>
#include <memory>
#include <atomic>
#include <string>

#include "channels/connection.h"
#include "channels/proxy_stream.h"

struct jmep_ucx;

namespace jmep {

struct UcxApi;  // the library's entry points (ucx_connection.cc)

class UcxWorker {
 public:
  // lib_path: libjmep_ucx.so; signal_mode: 0 rma, 1 active messages.
  UcxWorker(const std::string& lib_path, int rank, int nranks, char* base, uint64_t bytes,
            int signal_mode, int64_t timeout_ns, ProxyStream* ps);
  ~UcxWorker();
  UcxWorker(const UcxWorker&) = delete;
  UcxWorker& operator=(const UcxWorker&) = delete;

  std::string address() const;
  void connect(int peer, const std::string& blob);  // throws on failure
  int progress();                                   // < 0 after an error
  std::string error() const;
  int failed_peer() const;
  // A lost peer loses only itself (jmep_ucx_set_peer_isolation): for a group
  // that masks lost ranks (on_peer_failure="mask"). Any thread, any time.
  void set_peer_isolation(bool on);
  bool peer_isolation() const { return isolated_.load(std::memory_order_acquire); }
  std::string describe(int peer) const;
  const UcxApi& api() const { return *api_; }
  jmep_ucx* handle() const { return u_; }
  int signal_mode() const { return signal_mode_; }

 private:
  static void apply(void* ctx, int op, uint64_t offset, uint64_t value);
  const UcxApi* api_;
  jmep_ucx* u_ = nullptr;
  char* base_;
  int signal_mode_;
  ProxyStream* ps_;
  bool apply_failed_ = false;
  std::atomic<bool> isolated_{false};
};

class UcxConnection : public Connection {
 public:
  UcxConnection(UcxWorker* w, int peer) : w_(w), peer_(peer) {}
  bool put(uint64_t dst_off, uint64_t src_off, uint64_t bytes) override;
  bool signal(uint64_t sem_off, uint64_t value) override;
  bool atomic_add(uint64_t dst_off, int64_t delta) override;
  bool flush() override;
  std::string error() const override { return w_->error(); }
  const char* kind() const override { return "ucx"; }

 private:
  UcxWorker* w_;
  int peer_;
};

// Signal mode from JMEP_UCX_SIGNALS ("am" default, "rma").
int ucx_signal_mode_from_env();

}  // namespace jmep
