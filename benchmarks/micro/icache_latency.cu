// What running code costs when it is not in the SM's instruction caches
// (issue 14). At small T an LL kernel executes most of its instructions once
// per call, and between two calls the other LL kernel (and XLA's) runs on every
// SM, so the question is how much of a call's time is instruction fetch.
//
// straight<N, kTag>: one warp per SM runs N independent-ish IMADs (8 chains,
// so a warm pass issues about one a cycle) twice in the same launch: pass 0
// finds the code as the previous kernel left the caches, pass 1 runs it warm
// (when it fits). Launched either back to back (pass 0 warm too) or after a
// kernel of other code (kTag = 1) of the same size (pass 0 cold). Code size is
// 16 bytes an instruction on sm_90: N = 512 is 8 KB.
//   nvcc -O3 -std=c++17 -arch=sm_90 benchmarks/micro/icache_latency.cu -o /tmp/icache
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <vector>

#include "micro_common.cuh"

namespace {

struct Args {
  uint32_t m, c;        // runtime constants: nothing folds
  uint32_t* sink;       // keeps the chains alive
  long long* cycles;    // [3 * block]: before pass 0, before pass 1, after pass 1
};

template <int N, int kTag>
__global__ void __launch_bounds__(32, 1) straight(Args a) {
  uint32_t x[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) x[i] = threadIdx.x + i + kTag;
  long long t[3];
#pragma unroll 1
  for (int pass = 0; pass < 2; ++pass) {
    t[pass] = clock64();
#pragma unroll
    for (int i = 0; i < N; ++i)
      asm volatile("mad.lo.u32 %0, %0, %1, %2;" : "+r"(x[i & 7]) : "r"(a.m), "r"(a.c + kTag));
  }
  t[2] = clock64();
  uint32_t s = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) s ^= x[i];
  if (threadIdx.x == 0) {
    a.sink[blockIdx.x] = s;
    for (int i = 0; i < 3; ++i) a.cycles[3 * blockIdx.x + i] = t[i];
  }
}

template <int N>
void run(int sms, double ghz, int launches) {
  Args a{3u, 7u, nullptr, nullptr};
  ck(cudaMalloc(&a.sink, sms * 4), "sink");
  ck(cudaMalloc(&a.cycles, 3 * sms * 8), "cycles");
  std::vector<long long> h(3 * sms);
  for (int evict = 0; evict < 2; ++evict) {
    std::vector<double> p0, p1;
    for (int i = 0; i < launches; ++i) {
      if (evict) straight<N, 1><<<sms, 32>>>(a);  // other code of the same size first
      straight<N, 0><<<sms, 32>>>(a);
      ck(cudaMemcpy(h.data(), a.cycles, h.size() * 8, cudaMemcpyDeviceToHost), "cycles");
      if (i < 5) continue;
      std::vector<double> b0, b1;
      for (int b = 0; b < sms; ++b) {
        b0.push_back(static_cast<double>(h[3 * b + 1] - h[3 * b]));
        b1.push_back(static_cast<double>(h[3 * b + 2] - h[3 * b + 1]));
      }
      p0.push_back(median(b0));
      p1.push_back(median(b1));
    }
    const double kb = N * 16 / 1024.0, c0 = median(p0), c1 = median(p1);
    std::printf("%6.0f KB of code, %-22s: pass 0 %7.0f cyc (%6.2f us), pass 1 %7.0f cyc (%6.2f us)"
                " | cold - warm %6.2f us = %5.1f ns/KB\n",
                kb, evict ? "after other code" : "back to back", c0, c0 / ghz / 1e3, c1,
                c1 / ghz / 1e3, (c0 - c1) / ghz / 1e3, (c0 - c1) / ghz / kb);
  }
  cudaFree(a.sink);
  cudaFree(a.cycles);
}

}  // namespace

int main(int argc, char** argv) {
  const int launches = argc > 1 ? std::atoi(argv[1]) : 45;
  cudaDeviceProp prop;
  ck(cudaGetDeviceProperties(&prop, 0), "props");
  int khz = 0;
  ck(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, 0), "clock");
  const double ghz = khz / 1e6;
  std::printf("%s, %d SMs, one warp per SM, SM clock %.2f GHz (nominal max; ns figures "
              "assume it); medians over blocks, then launches (%d)\n",
              prop.name, prop.multiProcessorCount, ghz, launches - 5);
  run<512>(prop.multiProcessorCount, ghz, launches);
  run<1024>(prop.multiProcessorCount, ghz, launches);
  run<2048>(prop.multiProcessorCount, ghz, launches);
  run<4096>(prop.multiProcessorCount, ghz, launches);
  run<8192>(prop.multiProcessorCount, ghz, launches);
  return 0;
}
