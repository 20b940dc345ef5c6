// Direct peer-access fallback for one process driving all GPUs of the group:
// each GPU gets a plain cudaMalloc buffer and the others reach it through
// cudaDeviceEnablePeerAccess (raw NVLink pointers, i.e. what a memory channel
// gives). Used when the channel layer is not in the build (and by tests to
// separate kernel bugs from channel bugs); no port channels, no multi-process.
#include <cuda_runtime_api.h>

#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "handlers/ll_entry.cuh"
#include "handlers/ll_registry.h"

namespace jmep {
namespace {

// Buffers and error records of the whole group; freed with the last entry.
struct P2pGroup {
  std::vector<int> devices;
  std::vector<char*> buffers;
  std::vector<ErrorRecord*> errors;
  ~P2pGroup() {
    int saved = 0;
    cudaGetDevice(&saved);
    for (size_t i = 0; i < devices.size(); ++i) {
      cudaSetDevice(devices[i]);
      if (i < buffers.size() && buffers[i]) cudaFree(buffers[i]);
      if (i < errors.size() && errors[i]) cudaFreeHost(errors[i]);
    }
    cudaSetDevice(saved);
  }
};

}  // namespace

void ll_register_p2p(int64_t buffer_id, const std::vector<int>& devices, int64_t max_tokens,
                     int64_t hidden, int64_t num_experts, double timeout_s) {
  const int R = static_cast<int>(devices.size());
  ll_check_sizes(max_tokens, hidden, num_experts, R);
  const LlLayout layout = LlLayout::make(max_tokens, hidden, R, num_experts);
  int saved = 0;
  ll_cuda_check(cudaGetDevice(&saved), "cudaGetDevice");
  auto group = std::make_shared<P2pGroup>();
  group->devices = devices;
  try {
    for (int i = 0; i < R; ++i) {
      ll_cuda_check(cudaSetDevice(devices[i]), "cudaSetDevice");
      char* buf = nullptr;
      ll_cuda_check(cudaMalloc(&buf, layout.total_bytes()), "cudaMalloc(LL buffer)");
      group->buffers.push_back(buf);
      ErrorRecord* err = nullptr;
      ll_cuda_check(cudaHostAlloc(reinterpret_cast<void**>(&err), sizeof(ErrorRecord),
                                  cudaHostAllocMapped | cudaHostAllocPortable),
                    "cudaHostAlloc(error record)");
      std::memset(err, 0, sizeof(ErrorRecord));
      group->errors.push_back(err);
      for (int j = 0; j < R; ++j) {
        if (j == i) continue;
        int ok = 0;
        ll_cuda_check(cudaDeviceCanAccessPeer(&ok, devices[i], devices[j]), "cudaDeviceCanAccessPeer");
        if (!ok)
          throw std::runtime_error("GPU " + std::to_string(devices[i]) + " cannot access GPU " +
                                   std::to_string(devices[j]) + " directly; use the channel layer");
        cudaError_t e = cudaDeviceEnablePeerAccess(devices[j], 0);
        if (e == cudaErrorPeerAccessAlreadyEnabled) cudaGetLastError();
        else ll_cuda_check(e, "cudaDeviceEnablePeerAccess");
      }
    }
    const int64_t timeout_ns = timeout_s > 0 ? static_cast<int64_t>(timeout_s * 1e9) : 0;
    for (int i = 0; i < R; ++i) {
      ll_cuda_check(cudaSetDevice(devices[i]), "cudaSetDevice");
      std::vector<LlPeer> peers(R);
      for (int j = 0; j < R; ++j)
        peers[j] = LlPeer{group->buffers[j], j == i ? kLlSelf : kLlMemory, 0};
      auto e = std::make_shared<LlEntry>();
      e->owned = group;
      e->device = devices[i];
      e->host_error = group->errors[i];
      ErrorRecord* err_dev = nullptr;
      ll_cuda_check(cudaHostGetDevicePointer(reinterpret_cast<void**>(&err_dev), group->errors[i], 0),
                    "cudaHostGetDevicePointer");
      ll_init_state(*e, layout, group->buffers[i], i, R, max_tokens, hidden, num_experts, nullptr,
                    err_dev, timeout_ns, peers.data(), /*any_port=*/false);
      ll_cuda_check(cudaDeviceSynchronize(), "LL registration");
      ll_insert(buffer_id, std::move(e));
    }
  } catch (...) {
    cudaSetDevice(saved);
    for (int d : devices) ll_unregister(buffer_id, d);
    throw;
  }
  cudaSetDevice(saved);
}

}  // namespace jmep
