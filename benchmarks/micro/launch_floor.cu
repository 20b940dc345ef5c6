// The floor under an LL kernel's duration at T = 1 (issue 14): kernels launched
// as the LL kernels are (one 512-thread block per SM, launch_bounds(512, 1)) that
// do less and less of their work, so a profiler's duration for each says what a
// piece costs on its own:
//   empty     nothing: launch, block scheduling and teardown
//   phase     one grid-wide phase boundary at system scope (every block
//             release-adds a counter, then acquires it until all have): what a
//             count publish that every receiver waits for costs
//   chain     the shortest dispatch of one token that keeps the LL structure:
//             block 0 loads a 7 KB fp8 row, stores it into 8 slots (K = 8),
//             releases one flag per slot at system scope; blocks 1..8 each
//             acquire their flag and copy the slot out; the others end at once
//   chain_gpu the same with gpu-scope release/acquire (right for a rank
//             sending to itself only: not a shortcut the LL kernels may take)
// Each kernel also writes the span from the first block's start to the last
// block's end (%globaltimer), printed as a median. Durations as the CUDA
// profiler sees them come from ncu without clock locking:
//   nvcc -O3 -std=c++17 -arch=sm_90 benchmarks/micro/launch_floor.cu -o /tmp/floor
//   ncu --clock-control none --metrics gpu__time_duration.sum --csv /tmp/floor
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "micro_common.cuh"

namespace {

constexpr int kThreads = 512, kSlots = 8, kRowVecs = 7168 / 16;  // fp8 row: 448 x 16 B
enum Mode { kEmpty, kPhase, kChain, kChainGpu };

struct Args {
  const uint4* row;    // the token's row (input)
  uint4* slots;        // kSlots x kRowVecs (the receive buffer)
  uint4* out;          // kSlots x kRowVecs (the receiver's output)
  unsigned long long* flags;  // kSlots flags, then the phase counter
  unsigned long long launch;  // 1, 2, ...: what a flag must reach this launch
  uint64_t* span;      // [2 * blockIdx]: start, end
};

template <Mode kMode>
__global__ void __launch_bounds__(kThreads, 1) floor_kernel(Args a) {
  constexpr bool kSys = kMode != kChainGpu;
  const int tid = threadIdx.x, b = blockIdx.x;
  uint64_t t0 = 0;
  if (tid == 0) t0 = gtimer();
  if (kMode == kPhase) {
    if (tid == 0) {
      release_add<true>(a.flags + kSlots, 1ull);
      const unsigned long long want = a.launch * gridDim.x;
      while (acquire_load<true>(a.flags + kSlots) < want) {
      }
    }
    __syncthreads();
  } else if (kMode == kChain || kMode == kChainGpu) {
    if (b == 0) {
      // One round: every thread's loads before its stores (448 vectors, 512 threads).
      if (tid < kRowVecs) {
        const uint4 v = __ldg(a.row + tid);
#pragma unroll
        for (int s = 0; s < kSlots; ++s) a.slots[s * kRowVecs + tid] = v;
      }
      __syncthreads();
      if (tid < kSlots) release_add<kSys>(a.flags + tid, 1ull);
    } else if (b <= kSlots) {
      const int s = b - 1;
      if (tid == 0)
        while (acquire_load<kSys>(a.flags + s) < a.launch) {
        }
      __syncthreads();
      if (tid < kRowVecs) a.out[s * kRowVecs + tid] = __ldcg(a.slots + s * kRowVecs + tid);
    }
  }
  if (tid == 0) {
    a.span[2 * b] = t0;
    a.span[2 * b + 1] = gtimer();
  }
}

template <Mode kMode>
void run(const char* name, int grid, int launches) {
  Args a{};
  uint4 *row, *slots, *out;
  ck(cudaMalloc(&row, kRowVecs * 16), "row");
  ck(cudaMalloc(&slots, kSlots * kRowVecs * 16), "slots");
  ck(cudaMalloc(&out, kSlots * kRowVecs * 16), "out");
  ck(cudaMalloc(&a.flags, (kSlots + 1) * 8), "flags");
  ck(cudaMalloc(&a.span, 2 * grid * 8), "span");
  ck(cudaMemset(row, 3, kRowVecs * 16), "row");
  ck(cudaMemset(a.flags, 0, (kSlots + 1) * 8), "flags");
  a.row = row;
  a.slots = slots;
  a.out = out;
  std::vector<double> spans, starts;
  std::vector<uint64_t> h(2 * grid);
  for (int i = 1; i <= launches; ++i) {
    a.launch = static_cast<unsigned long long>(i);
    floor_kernel<kMode><<<grid, kThreads>>>(a);
    ck(cudaGetLastError(), "launch");
    ck(cudaMemcpy(h.data(), a.span, h.size() * 8, cudaMemcpyDeviceToHost), "span");
    if (i <= 10) continue;  // warm-up
    uint64_t first = UINT64_MAX, last_start = 0, end = 0;
    for (int b = 0; b < grid; ++b) {
      first = std::min(first, h[2 * b]);
      last_start = std::max(last_start, h[2 * b]);
      end = std::max(end, h[2 * b + 1]);
    }
    spans.push_back((end - first) / 1e3);
    starts.push_back((last_start - first) / 1e3);
  }
  std::printf("%-10s grid %3d: first block start -> last block end %5.2f us (last block starts "
              "at %5.2f)\n", name, grid, median(spans), median(starts));
  cudaFree(row);
  cudaFree(slots);
  cudaFree(out);
  cudaFree(a.flags);
  cudaFree(a.span);
}

}  // namespace

int main(int argc, char** argv) {
  const int launches = argc > 1 ? std::atoi(argv[1]) : 110;
  cudaDeviceProp prop;
  ck(cudaGetDeviceProperties(&prop, 0), "props");
  const int sms = prop.multiProcessorCount;
  std::printf("%s, %d SMs, %d threads a block; %%globaltimer medians over %d launches\n",
              prop.name, sms, kThreads, launches - 10);
  run<kEmpty>("empty", 1, launches);
  run<kEmpty>("empty", sms, launches);
  run<kPhase>("phase", sms, launches);
  run<kChain>("chain", sms, launches);
  run<kChainGpu>("chain_gpu", sms, launches);
  return 0;
}
