// Host-safe types shared by kernels and host code: phases, error codes, the
// error record (host-mapped, first error wins) and the wait site.
#pragma once
#include <cstdint>

namespace jmep {

// Which part of an operation a wait belonged to (reported on timeout).
enum Phase : int32_t {
  kPhaseNone = 0,
  kPhaseTest = 1,
  kPhaseBarrier = 2,
  kPhaseDispatchSend = 3,
  kPhaseDispatchRecv = 4,
  kPhaseCombineSend = 5,
  kPhaseCombineRecv = 6,
  kPhaseProxyFlush = 7,
  kPhaseProxy = 8,  // the host proxy itself (its connection to the peer failed)
  kPhaseMaskReport = 9,  // a peer reported it masked this rank (LL rank masks)
};

enum ErrorCode : int32_t {
  kErrOk = 0,
  kErrTimeout = 1,       // a wait outlived its timeout
  kErrBadExpert = 2,     // (counted, not fatal) expert id outside [-1, E)
  kErrFifoTimeout = 3,   // the proxy FIFO stayed full / flush never completed
  kErrPeerLost = 4,      // the proxy's connection to the peer failed (e.g. UCX endpoint error)
};

// Codes that end every wait at once (a wait on a lost peer would only time out).
inline constexpr bool error_aborts_waits(int32_t code) {
  return code == kErrTimeout || code == kErrPeerLost;
}

// First error wins (code is claimed with atomicCAS). Lives in host-mapped
// pinned memory so the host can read it without synchronising the stream.
struct ErrorRecord {
  int32_t code;
  int32_t rank;
  int32_t peer;
  int32_t phase;
  uint64_t detail;  // e.g. value seen / value expected
};

// Where a failing wait is reported: who I am, the peer, and the phase.
struct WaitSite {
  ErrorRecord* error;
  int64_t timeout_ns;  // <= 0: wait forever (tests only)
  int32_t rank;
  int32_t peer;
  int32_t phase;
};

}  // namespace jmep
