// Host entry point that fills the device array of ChannelDeviceHandle (the
// struct is defined in a CUDA header, so this lives in a .cu file).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "channels/error_record.h"

namespace jmep {

struct ChannelDeviceHandle;

struct HandleInputs {
  int rank = 0, nranks = 0;
  char* local = nullptr;
  size_t sem_off = 0;                // semaphore area offset in every registered buffer
  std::vector<char*> peer_bufs;      // [nranks], mapped on my device
  std::vector<int> kinds;            // [nranks], ChannelKind
  uint64_t* state = nullptr;         // device: mem expected[n], port expected[n], head, tail cache, poll lock
  void* fifo_host = nullptr;         // host-mapped: [tail (256 B)][slots]
  uint32_t fifo_size = 0;
  ErrorRecord* err_dev = nullptr;
  int64_t timeout_ns = 0;
};

// Allocates (cudaMalloc) and fills the [nranks] handle array on the current device.
ChannelDeviceHandle* build_device_handles(const HandleInputs& in);

}  // namespace jmep
