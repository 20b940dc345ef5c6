#include "channels/error_text.h"

namespace jmep {
namespace {

// Indexed by Phase (error_record.h).
const char* const kPhaseNames[] = {"none",           "test",          "barrier",
                                   "dispatch send",  "dispatch receive", "combine send",
                                   "combine receive", "proxy flush",  "port-channel proxy",
                                   "mask report"};
constexpr int kNumPhases = sizeof(kPhaseNames) / sizeof(kPhaseNames[0]);
static_assert(kNumPhases == kPhaseMaskReport + 1, "one name per Phase");

const char* what_happened(int32_t code) {
  switch (code) {
    case kErrTimeout: return "timed out waiting for";
    case kErrFifoTimeout: return "timed out on the port-channel FIFO towards";
    case kErrPeerLost: return "lost its connection to";
    default: return "failed with";
  }
}

}  // namespace

const char* phase_name(int32_t phase) {
  return (phase >= 0 && phase < kNumPhases) ? kPhaseNames[phase] : "?";
}

std::string describe_error(const ErrorRecord& r) {
  const char* phase = phase_name(r.phase);
  return "rank " + std::to_string(r.rank) + " " + what_happened(r.code) + " peer " +
         std::to_string(r.peer) + " in " + phase + " (error code " + std::to_string(r.code) +
         ", value seen " + std::to_string(r.detail) + ")";
}

ErrorRecord snapshot_error(const ErrorRecord* rec) {
  const volatile ErrorRecord* v = rec;
  ErrorRecord r;
  r.code = v->code;
  r.rank = v->rank;
  r.peer = v->peer;
  r.phase = v->phase;
  r.detail = v->detail;
  return r;
}

}  // namespace jmep
