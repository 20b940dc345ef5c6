// Same-host connection: see ipc_connection.h.
#include "channels/ipc_connection.h"

namespace jmep {

bool IpcConnection::ok(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return true;
  if (error_.empty()) error_ = std::string("CUDA IPC ") + what + ": " + cudaGetErrorString(e);
  return false;
}

bool IpcConnection::put(uint64_t dst_off, uint64_t src_off, uint64_t bytes) {
  if (bytes == 0) return true;
  return ok(cudaMemcpyAsync(remote_ + dst_off, local_ + src_off, bytes, cudaMemcpyDefault,
                            ps_->stream()),
            "put");
}

bool IpcConnection::signal(uint64_t sem_off, uint64_t value) {
  return ok(ps_->store(reinterpret_cast<uint64_t*>(remote_ + sem_off), value), "signal");
}

bool IpcConnection::atomic_add(uint64_t dst_off, int64_t delta) {
  return ok(ps_->add(reinterpret_cast<uint64_t*>(remote_ + dst_off), delta), "atomic add");
}

bool IpcConnection::flush() { return ok(cudaStreamSynchronize(ps_->stream()), "flush"); }

}  // namespace jmep
