// Host-safe layout of a port-channel FIFO entry (shared by the device push
// in port_channel_device.cuh and the host proxy).
#pragma once
#include <cstdint>

namespace jmep {

enum TriggerType : uint32_t {
  kTrigPut = 1,
  kTrigSignal = 2,
  kTrigPutSignal = 3,
  kTrigAdd = 4,     // src field carries the signed delta
  kTrigFlush = 5,   // proxy drains its stream before retiring this entry
};

// One FIFO entry. `meta` is written last: (seq + 1) << 24 | peer << 8 | type,
// so the proxy knows the entry is complete and not a stale one from the
// previous lap of the ring.
struct alignas(32) FifoTrigger {
  uint64_t dst;
  uint64_t src;
  uint64_t size;
  uint64_t meta;
};

}  // namespace jmep
