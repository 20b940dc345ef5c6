// Host side of the rank masks (ll_mask.h). The words live in the device state
// (LlDeviceState::masked, mask_by, mask_phase) and, for the peers' reports, in
// the registered buffer (LlLayout::mask_word); the kernels read them at the
// start of each call, so a change here is in force from the next call.
#include <cuda_runtime_api.h>

#include <cstddef>
#include <stdexcept>

#include "channels/communicator.h"
#include "channels/error_text.h"
#include "handlers/ll_entry.cuh"
#include "handlers/ll_mask.h"
#include "handlers/ll_registry.h"

namespace jmep {
namespace {

struct MaskWords {
  unsigned long long masked = 0;
  int32_t by[kLlMaxRanks];
  int32_t phase[kLlMaxRanks];
};

char* state_bytes(const LlEntry& e) { return reinterpret_cast<char*>(e.st.state); }

MaskWords read_mask(const LlEntry& e) {
  MaskWords w;
  ll_cuda_check(cudaDeviceSynchronize(), "sync for the rank mask");
  ll_cuda_check(cudaMemcpy(&w.masked, state_bytes(e) + offsetof(LlDeviceState, masked),
                           sizeof(w.masked), cudaMemcpyDeviceToHost), "read the rank mask");
  ll_cuda_check(cudaMemcpy(w.by, state_bytes(e) + offsetof(LlDeviceState, mask_by), sizeof(w.by),
                           cudaMemcpyDeviceToHost), "read the rank mask");
  ll_cuda_check(cudaMemcpy(w.phase, state_bytes(e) + offsetof(LlDeviceState, mask_phase),
                           sizeof(w.phase), cudaMemcpyDeviceToHost), "read the rank mask");
  return w;
}

void write_mask(const LlEntry& e, const MaskWords& w) {
  ll_cuda_check(cudaMemcpy(state_bytes(e) + offsetof(LlDeviceState, masked), &w.masked,
                           sizeof(w.masked), cudaMemcpyHostToDevice), "write the rank mask");
  ll_cuda_check(cudaMemcpy(state_bytes(e) + offsetof(LlDeviceState, mask_by), w.by, sizeof(w.by),
                           cudaMemcpyHostToDevice), "write the rank mask");
  ll_cuda_check(cudaMemcpy(state_bytes(e) + offsetof(LlDeviceState, mask_phase), w.phase,
                           sizeof(w.phase), cudaMemcpyHostToDevice), "write the rank mask");
  ll_cuda_check(cudaDeviceSynchronize(), "write the rank mask");
}

}  // namespace

void ll_set_peer_failure(int64_t buffer_id, bool mask) {
  for (auto& e : ll_find_all_or_throw(buffer_id)) {
    e->st.mask_on_failure = mask ? 1 : 0;
    // A lost UCX peer must not stop the proxy serving the others (they stay in the group).
    if (e->comm) e->comm->set_ucx_peer_isolation(mask);
  }
}

void ll_mask_ranks(int64_t buffer_id, const std::vector<int>& ranks) {
  for (auto& e : ll_find_all_or_throw(buffer_id)) {
    for (int r : ranks)
      if (r < 0 || r >= e->st.nranks)
        throw std::invalid_argument("mask_ranks: rank " + std::to_string(r) + " is not in [0, " +
                                    std::to_string(e->st.nranks) + ")");
    LlDeviceGuard g(e->device);
    MaskWords w = read_mask(*e);
    for (int r : ranks) {
      if ((w.masked >> r) & 1ull) continue;
      w.masked |= 1ull << r;
      w.by[r] = -1;
      w.phase[r] = kPhaseNone;
    }
    write_mask(*e, w);
  }
}

void ll_unmask_all(int64_t buffer_id) {
  for (auto& e : ll_find_all_or_throw(buffer_id)) {
    LlDeviceGuard g(e->device);
    ll_cuda_check(cudaDeviceSynchronize(), "sync for the rank mask");
    MaskWords w;
    for (int r = 0; r < kLlMaxRanks; ++r) w.by[r] = -1, w.phase[r] = kPhaseNone;
    write_mask(*e, w);
    const LlLayout& L = e->st.layout;
    ll_cuda_check(cudaMemset(e->st.local + L.mask_off, 0, L.mask_bytes), "clear mask reports");
    ll_cuda_check(cudaDeviceSynchronize(), "clear mask reports");
  }
}

std::vector<int> ll_masked_ranks(int64_t buffer_id, int device) {
  auto e = ll_find_or_throw(buffer_id, device);
  LlDeviceGuard g(e->device);
  const MaskWords w = read_mask(*e);
  std::vector<int> out;
  for (int r = 0; r < e->st.nranks; ++r)
    if ((w.masked >> r) & 1ull) out.push_back(r);
  return out;
}

std::vector<std::tuple<int, int, std::string>> ll_mask_events(int64_t buffer_id, int device) {
  auto e = ll_find_or_throw(buffer_id, device);
  LlDeviceGuard g(e->device);
  const MaskWords w = read_mask(*e);
  std::vector<std::tuple<int, int, std::string>> out;
  for (int r = 0; r < e->st.nranks; ++r)
    if ((w.masked >> r) & 1ull)
      out.emplace_back(r, w.by[r], w.by[r] < 0 ? std::string("host") : phase_name(w.phase[r]));
  return out;
}

}  // namespace jmep
