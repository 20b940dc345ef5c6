// The alive-experts kernel (ll_alive.cu): the Buffer's rank mask as int32[E].
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/ll_args.cuh"

namespace jmep {

void ll_launch_alive(const LlStatic& s, int32_t* alive, const int32_t* order_in, int32_t* order_out,
                     cudaStream_t stream);

}  // namespace jmep
