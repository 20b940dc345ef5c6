// A peer on this host: its registered buffer is mapped into my device's
// address space (CUDA IPC across processes, a raw pointer within one), and the
// proxy's stream moves the bytes with the copy engine. Ordering: one stream,
// so a signal or add enqueued after a put runs after the copy has landed.
#pragma once
#include "channels/connection.h"
#include "channels/proxy_stream.h"

namespace jmep {

class IpcConnection : public Connection {
 public:
  IpcConnection(ProxyStream* ps, char* local, char* remote)
      : ps_(ps), local_(local), remote_(remote) {}
  bool put(uint64_t dst_off, uint64_t src_off, uint64_t bytes) override;
  bool signal(uint64_t sem_off, uint64_t value) override;
  bool atomic_add(uint64_t dst_off, int64_t delta) override;
  bool flush() override;
  std::string error() const override { return error_; }
  const char* kind() const override { return "cuda-ipc"; }

 private:
  bool ok(cudaError_t e, const char* what);
  ProxyStream* ps_;
  char* local_;
  char* remote_;
  std::string error_;
};

}  // namespace jmep
