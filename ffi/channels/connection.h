// What a port-channel trigger needs from whatever reaches the peer, behind one
// interface (as MSCCL++ puts CUDA IPC, InfiniBand and Ethernet behind its
// Connection): ipc_connection.h for peers on this host, ucx_connection.h for
// peers on other hosts. Only the proxy thread calls a connection, in FIFO
// order. Every operation returns false after recording why (error()).
//
// Guarantee each kind gives: bytes put before a signal or atomic_add on the
// same connection are visible to the peer's kernels once they observe that
// signal or add.
#pragma once
#include <cstdint>
#include <string>

namespace jmep {

class Connection {
 public:
  virtual ~Connection() = default;
  // My registered buffer [src_off, +bytes) -> the peer's [dst_off, +bytes).
  virtual bool put(uint64_t dst_off, uint64_t src_off, uint64_t bytes) = 0;
  // Publish `value`, the new count of my signals, into my (single-writer)
  // semaphore word at sem_off in the peer's buffer.
  virtual bool signal(uint64_t sem_off, uint64_t value) = 0;
  // Signed add on an int64 word of the peer's buffer.
  virtual bool atomic_add(uint64_t dst_off, int64_t delta) = 0;
  // Everything issued before is complete at the peer.
  virtual bool flush() = 0;
  virtual std::string error() const = 0;
  virtual const char* kind() const = 0;  // "cuda-ipc", "ucx"
};

}  // namespace jmep
