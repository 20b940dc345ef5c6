// Rank masks of a Buffer from the host (issue 17): the failure mode, the
// user's masks, and what the device has masked. Every call synchronises the
// Buffer's devices: between steps, never inside a jitted function (there the
// mask is read on the device: the jmep_ll_alive custom call).
#pragma once
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace jmep {

// on_peer_failure: "mask" (true) or "raise"; set right after registration.
void ll_set_peer_failure(int64_t buffer_id, bool mask);
// Adds `ranks` to the mask of every device entry of the Buffer in this process.
void ll_mask_ranks(int64_t buffer_id, const std::vector<int>& ranks);
// Clears the mask, its records and the peers' mask reports to us.
void ll_unmask_all(int64_t buffer_id);
// Masked ranks as the device sees them, ascending.
std::vector<int> ll_masked_ranks(int64_t buffer_id, int device);
// (peer, masked by: a rank, or -1 for the host, phase name) per masked peer.
std::vector<std::tuple<int, int, std::string>> ll_mask_events(int64_t buffer_id, int device);

}  // namespace jmep
