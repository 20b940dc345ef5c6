// alive[e] = 1 unless expert e's owner rank is masked on this device (issue 17):
// what a router reads inside a jitted step, no host work per call.
#include "kernels/ll_alive.h"

namespace jmep {
namespace {

__global__ void ll_alive_kernel(const LlDeviceState* st, int32_t* alive, int num_experts,
                                int local_experts, const int32_t* order_in, int32_t* order_out) {
  const unsigned long long m = *reinterpret_cast<const volatile unsigned long long*>(&st->masked);
  for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < num_experts; e += gridDim.x * blockDim.x)
    alive[e] = ((m >> (e / local_experts)) & 1ull) ? 0 : 1;
  if (blockIdx.x == 0 && threadIdx.x == 0) *order_out = *order_in;
}

}  // namespace

void ll_launch_alive(const LlStatic& s, int32_t* alive, const int32_t* order_in, int32_t* order_out,
                     cudaStream_t stream) {
  ll_alive_kernel<<<(s.num_experts + 255) / 256, 256, 0, stream>>>(
      s.state, alive, s.num_experts, s.local_experts, order_in, order_out);
}

}  // namespace jmep
