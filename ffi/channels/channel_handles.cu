// Fills the per-peer device handles from what connect() learned.
#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "channels/channel_device.cuh"
#include "channels/channel_handles_host.h"

namespace jmep {

static_assert(std::is_trivially_copyable<ChannelDeviceHandle>::value,
              "handles are copied to the device by value");

ChannelDeviceHandle* build_device_handles(const HandleInputs& in) {
  const int n = in.nranks;
  std::vector<ChannelDeviceHandle> hs(n);
  FifoTrigger* slots = nullptr;
  uint64_t* tail = nullptr;
  char* fifo_dev = nullptr;
  cudaError_t e = cudaHostGetDevicePointer(reinterpret_cast<void**>(&fifo_dev), in.fifo_host, 0);
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("fifo device pointer: ") + cudaGetErrorString(e));
  tail = reinterpret_cast<uint64_t*>(fifo_dev);
  slots = reinterpret_cast<FifoTrigger*>(fifo_dev + 256);
  uint64_t* my_sems = reinterpret_cast<uint64_t*>(in.local + in.sem_off);
  for (int p = 0; p < n; ++p) {
    ChannelDeviceHandle& h = hs[p];
    h.kind = in.kinds[p];
    h.pad = 0;
    char* remote = in.peer_bufs[p] != nullptr ? in.peer_bufs[p] : in.local;
    uint64_t* peer_sems = reinterpret_cast<uint64_t*>(remote + in.sem_off);
    h.mem.local = in.local;
    h.mem.remote = remote;
    h.mem.remote_sem = peer_sems + in.rank;       // its memory sem slot for me
    h.mem.local_sem = my_sems + p;                // my memory sem slot for it
    h.mem.expected = in.state + p;
    h.port.slots = slots;
    h.port.head = in.state + 2 * n;
    h.port.tail_host = tail;
    h.port.tail_cache = in.state + 2 * n + 1;
    h.port.poll_lock = in.state + 2 * n + 2;
    h.port.local_sem = my_sems + n + p;           // its proxy writes here
    h.port.expected = in.state + n + p;
    h.port.error = in.err_dev;
    h.port.timeout_ns = in.timeout_ns;
    h.port.fifo_size = in.fifo_size;
    h.port.rank = in.rank;
    h.port.peer = p;
    h.port.pad = 0;
  }
  ChannelDeviceHandle* d = nullptr;
  e = cudaMalloc(&d, sizeof(ChannelDeviceHandle) * n);
  if (e == cudaSuccess)
    e = cudaMemcpy(d, hs.data(), sizeof(ChannelDeviceHandle) * n, cudaMemcpyHostToDevice);
  if (e != cudaSuccess) {
    if (d) cudaFree(d);
    throw std::runtime_error(std::string("channel handles: ") + cudaGetErrorString(e));
  }
  return d;
}

}  // namespace jmep
