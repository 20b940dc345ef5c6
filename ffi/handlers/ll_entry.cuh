// One registry entry: what it keeps alive (communicator, or the buffers of the
// direct peer-access fallback) and the device-resident LL state the kernels use.
//
// Lifetime: the registry holds one reference from Buffer creation to close;
// every compiled executable that calls the Buffer holds another (ll_ref.cu,
// the FFI instantiate stage), so the device state outlives the executables
// that may replay kernels reading it. At close the entry is marked closed on
// the device (kernels then return at once, see ll_args.cuh) and lets go of the
// communicator / peer buffers; only dev_mem waits for the last executable.
#pragma once
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "kernels/ll_args.cuh"

namespace jmep {

class Communicator;

struct LlEntry {
  std::shared_ptr<Communicator> comm;  // channel-layer path
  std::shared_ptr<void> owned;         // p2p fallback: buffers shared by the group
  ErrorRecord* host_error = nullptr;   // p2p fallback: host view of st.error
  LlStatic st{};                       // copied into every launch
  int device = 0;
  int num_blocks = 0;
  int64_t discard_bytes = 0;  // steps of at least this many bf16 row bytes discard (ll_step_discards)
  void* dev_mem = nullptr;             // LlDeviceState + slot[2][E] + peers[R]
  // First device-side error seen (timeout, FIFO stall): once set, the LL state
  // (halves, counters) is undefined, so every later call fails with it.
  std::mutex failure_mu;
  std::string failure;

  LlEntry() = default;
  LlEntry(const LlEntry&) = delete;
  LlEntry& operator=(const LlEntry&) = delete;
  ~LlEntry();  // frees dev_mem on its device (ll_registry.cu)
};

// The entry's failure message, recording it first if the device has reported
// an error since (reads host-mapped memory: no synchronisation). Empty if none.
std::string ll_failure(LlEntry& e);

// Restores the caller's current device (host work may target another GPU).
struct LlDeviceGuard {
  int saved = 0;
  explicit LlDeviceGuard(int dev);
  ~LlDeviceGuard();
};

// Registered entry for (buffer id, device), or null. Thread-safe.
std::shared_ptr<LlEntry> ll_find(int64_t buffer_id, int device);

// Allocates and zeroes the device state of `e` (on e.device, which must be
// current), zeroes both halves' signal words of `buffer`, and fills e.st.
// peers_host: the peer table to copy, or null when a kernel fills it later;
// any_port: whether a peer is a port peer (the grid, ll_grid_blocks).
// Returns the device address of the peer table.
LlPeer* ll_init_state(LlEntry& e, const LlLayout& layout, char* buffer, int rank, int nranks,
                      int64_t max_tokens, int64_t hidden, int64_t num_experts,
                      ChannelDeviceHandle* handles, ErrorRecord* error, int64_t timeout_ns,
                      const LlPeer* peers_host, bool any_port);
// Copies the peer table into the kernels' by-value copy (LlStatic::peer_base).
void ll_set_peer_table(LlStatic& s, const LlPeer* peers, int nranks);
// The entry, or a runtime_error naming the Buffer (closed, or never here).
std::shared_ptr<LlEntry> ll_find_or_throw(int64_t buffer_id, int device);
// Adds (or replaces) the entry for (buffer id, e->device).
void ll_insert(int64_t buffer_id, std::shared_ptr<LlEntry> e);
// Throws std::invalid_argument unless the kernels support these sizes.
void ll_check_sizes(int64_t max_tokens, int64_t hidden, int64_t num_experts, int nranks);
// cudaError_t -> std::runtime_error.
void ll_cuda_check(int err, const char* what);

}  // namespace jmep
