// LL state per (buffer id, device): host-only interface, so the nanobind
// bindings (host compiler) and the FFI handlers (nvcc) share it.
// An entry is created once per Buffer and device (ll_register) and found by
// the FFI handlers on every call; nothing in it changes per call on the host.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

namespace jmep {

class Communicator;
struct LlEntry;  // ll_registry.cu

// Bytes of the registered buffer the LL layout needs (= config.size_hint).
int64_t ll_size_hint(int64_t m, int64_t h, int64_t r, int64_t e);
// True when this build has the LL kernels / the channel layer (port channels,
// communicators).
bool ll_enabled();
bool ll_has_channels();

void ll_register(int64_t buffer_id, std::shared_ptr<Communicator> comm, int64_t max_tokens,
                 int64_t hidden, int64_t num_experts);
// Fallback without communicators: one process, all `devices` of the group
// (rank i = devices[i]), reached through CUDA peer access (ll_p2p.cu).
void ll_register_p2p(int64_t buffer_id, const std::vector<int>& devices, int64_t max_tokens,
                     int64_t hidden, int64_t num_experts, double timeout_s);
bool ll_unregister(int64_t buffer_id, int device);
// Throws std::runtime_error if a device-side error (timeout, ...) was recorded.
void ll_check(int64_t buffer_id, int device);
// Expert ids outside [-1, E) dropped so far (synchronises the device: tests only).
int64_t ll_dropped(int64_t buffer_id, int device);

// Kernel timing booked on the device since the last reset (synchronises: for
// benchmarks): {dispatch calls, send ns, total ns, combine calls, send ns, total ns}.
std::vector<uint64_t> ll_timing(int64_t buffer_id, int device, bool reset);

// The XLA FFI handlers (XLA_FFI_Handler*), for nanobind capsules.
void* ll_dispatch_handler();
void* ll_combine_handler();
// Send halves of the split API (ll_ffi_split.cu); the receive halves are the
// handlers above with phases = 2.
void* ll_dispatch_send_handler();
void* ll_combine_send_handler();
// Combine's backward (ll_ffi_bwd.cu): the weighted dispatch into the forward
// handle's rows, and the per-slot (unreduced) combine.
void* ll_scatter_rows_handler();
void* ll_gather_rows_handler();

}  // namespace jmep
