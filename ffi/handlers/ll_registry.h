// LL state per (buffer id, device): host-only interface, so the nanobind
// bindings (host compiler) and the FFI handlers (nvcc) share it.
// An entry is created once per Buffer and device (ll_register) and found by
// the FFI handlers on every call; nothing in it changes per call on the host.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace jmep {

class Communicator;
struct LlEntry;  // ll_entry.cuh

// Bytes of the registered buffer the LL layout needs (= config.size_hint).
int64_t ll_size_hint(int64_t m, int64_t h, int64_t r, int64_t e);
void ll_register(int64_t buffer_id, std::shared_ptr<Communicator> comm, int64_t max_tokens,
                 int64_t hidden, int64_t num_experts);
// Fallback without communicators: one process, all `devices` of the group
// (rank i = devices[i]), reached through CUDA peer access (ll_p2p.cu).
void ll_register_p2p(int64_t buffer_id, const std::vector<int>& devices, int64_t max_tokens,
                     int64_t hidden, int64_t num_experts, double timeout_s);
// Close: the entry leaves the registry, its device state is marked closed
// (replayed kernels return at once) and its id is remembered as closed.
bool ll_unregister(int64_t buffer_id, int device);
// Every entry of a Buffer in this process (what an executable holds on to),
// whether that Buffer was closed, and the error a call on it then gets.
std::vector<std::shared_ptr<LlEntry>> ll_find_all(int64_t buffer_id);
bool ll_was_closed(int64_t buffer_id);
std::string ll_closed_message(int64_t buffer_id);
// Why a Buffer has no entry here: closed, or "no LL state for Buffer id N" + where.
std::string ll_missing_message(int64_t buffer_id, const std::string& where);
// ll_find_all, throwing ll_missing_message when the Buffer has no entry in this process.
std::vector<std::shared_ptr<LlEntry>> ll_find_all_or_throw(int64_t buffer_id);
// Throws std::runtime_error if a device-side error (timeout, ...) was recorded.
void ll_check(int64_t buffer_id, int device);
// Expert ids outside [-1, E) dropped so far (synchronises the device: tests only).
int64_t ll_dropped(int64_t buffer_id, int device);

// Kernel timing booked on the device since the last reset (synchronises: for
// benchmarks): {dispatch calls, send ns, total ns, combine calls, send ns, total ns}.
std::vector<uint64_t> ll_timing(int64_t buffer_id, int device, bool reset);

}  // namespace jmep
