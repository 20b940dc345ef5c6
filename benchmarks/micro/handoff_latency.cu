// How long one SM takes to hand rows to another inside one kernel, the LL
// kernels' pattern (issue 14): a block stores a message, releases a flag; a
// warp on another SM acquires the flag, then reads the message in one round of
// loads. The LL probes put ~2.5 us between "signal seen" and "row copied" at
// T = 1 on the H200, far more than an L2 round trip; this times the pieces
// alone, from %globaltimer and clock64, medians over launches:
//   fence    writer: the release-add (fence + add) returning
//   handoff  flag released -> flag seen by the reader
//   read1    reader: one round of loads of the fresh message (every load issued first)
//   read2    reader: the same loads again (now in L2 / L1-bypassing)
//   stale    reader: one round of loads of lines written in an earlier launch
// per flag scope (sys: what the kernels use for direct peers; gpu), message size
// (7 KB: one fp8 message; 57 KB: a token's eight) and grid (2 blocks; 132: one per
// SM as the LL kernels launch, the others idle).
//   nvcc -O3 -std=c++17 -arch=sm_90 benchmarks/micro/handoff_latency.cu -o /tmp/handoff
//   /tmp/handoff [launches]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "micro_common.cuh"

namespace {

constexpr int kThreads = 512;
enum Stamp { kW0, kW1, kR0, kR1, kR2, kR3, kR4, kStamps };

// One warp reads n vectors at p in one round (up to 16 a lane), returns a sum
// so the loads must complete.
__device__ __forceinline__ unsigned read_round(const uint4* p, int n, int lane) {
  uint4 v[16];
#pragma unroll
  for (int u = 0; u < 16; ++u) {
    const int c = lane + 32 * u;
    v[u] = c < n ? __ldcg(p + c) : make_uint4(0u, 0u, 0u, 0u);
  }
  unsigned s = 0;
#pragma unroll
  for (int u = 0; u < 16; ++u) s += v[u].x ^ v[u].w;
  return s;
}

// Block 0 writes `vecs` vectors of msg (this launch's value), then thread 0
// release-adds 1 to flag; block 1's warp 0 waits for flag == want, then reads
// the first min(vecs, 512) vectors (what one warp copies in one round), again,
// then the same amount of `stale` (written by the previous launch).
template <bool kSys>
__global__ void __launch_bounds__(kThreads, 1)
    handoff(uint4* msg, uint4* stale, int vecs, unsigned long long* flag, unsigned long long want,
            uint64_t* stamps, unsigned* sink) {
  const int tid = threadIdx.x, lane = tid & 31;
  if (blockIdx.x == 0) {
    const uint4 v = make_uint4(static_cast<unsigned>(want), 1u, 2u, 3u);
    for (int c = tid; c < vecs; c += blockDim.x) msg[c] = v;
    __syncthreads();
    if (tid == 0) {
      stamps[kW0] = gtimer();
      release_add<kSys>(flag, 1ull);
      stamps[kW1] = gtimer();
    }
  } else if (blockIdx.x == 1 && tid < 32) {
    unsigned long long f = 0;
    if (lane == 0)
      while ((f = acquire_load<kSys>(flag)) < want) {
      }
    f = __shfl_sync(0xffffffffu, f, 0);
    const uint64_t t0 = gtimer();
    const long long c0 = clock64();
    const int n = vecs < 512 ? vecs : 512;
    unsigned s = read_round(msg, n, lane);
    const uint64_t t1 = gtimer();
    const long long c1 = clock64();
    s += read_round(msg, n, lane);
    const uint64_t t2 = gtimer();
    s += read_round(stale, n, lane);
    const uint64_t t3 = gtimer();
    const long long c3 = clock64();
    if (lane == 0) {
      stamps[kR0] = t0;
      stamps[kR1] = t1;
      stamps[kR2] = t2;
      stamps[kR3] = t3;
      stamps[kR4] = static_cast<uint64_t>(c1 - c0) << 32 | static_cast<uint32_t>(c3 - c0);
      sink[0] = s + static_cast<unsigned>(f);
    }
  }
}

template <bool kSys>
void run(int bytes, int grid, int launches) {
  const int vecs = bytes / 16;
  uint4 *msg, *stale;
  unsigned long long* flag;
  uint64_t* stamps;
  unsigned* sink;
  ck(cudaMalloc(&msg, bytes), "msg");
  ck(cudaMalloc(&stale, bytes), "stale");
  ck(cudaMalloc(&flag, 8), "flag");
  ck(cudaMalloc(&stamps, kStamps * 8), "stamps");
  ck(cudaMalloc(&sink, 4), "sink");
  ck(cudaMemset(flag, 0, 8), "flag");
  ck(cudaMemset(stale, 1, bytes), "stale");
  std::vector<double> fence, hand, r1, r2, st, r1_cyc, st_cyc;
  for (int i = 1; i <= launches; ++i) {
    handoff<kSys><<<grid, kThreads>>>(msg, stale, vecs, flag, static_cast<unsigned long long>(i),
                                      stamps, sink);
    ck(cudaGetLastError(), "launch");
    uint64_t h[kStamps];
    ck(cudaMemcpy(h, stamps, sizeof(h), cudaMemcpyDeviceToHost), "stamps");
    if (i <= 10) continue;  // warm-up
    fence.push_back((h[kW1] - h[kW0]) / 1e3);
    hand.push_back((static_cast<double>(h[kR0]) - static_cast<double>(h[kW1])) / 1e3);
    r1.push_back((h[kR1] - h[kR0]) / 1e3);
    r2.push_back((h[kR2] - h[kR1]) / 1e3);
    st.push_back((h[kR3] - h[kR2]) / 1e3);
    r1_cyc.push_back(static_cast<double>(h[kR4] >> 32));
    st_cyc.push_back(static_cast<double>(h[kR4] & 0xffffffffu));
  }
  std::printf("%-4s %6d B grid %3d | fence %5.2f | handoff %5.2f | read1 %5.2f (%6.0f cyc) | read2 %5.2f"
              " | stale %5.2f | all three reads %6.0f cyc\n",
              kSys ? "sys" : "gpu", bytes, grid, median(fence), median(hand), median(r1),
              median(r1_cyc), median(r2), median(st), median(st_cyc));
  cudaFree(msg);
  cudaFree(stale);
  cudaFree(flag);
  cudaFree(stamps);
  cudaFree(sink);
}

}  // namespace

int main(int argc, char** argv) {
  const int launches = argc > 1 ? std::atoi(argv[1]) : 200;
  cudaDeviceProp prop;
  ck(cudaGetDeviceProperties(&prop, 0), "props");
  std::printf("%s, %d SMs; medians over %d launches, us (cyc: SM clock cycles)\n", prop.name,
              prop.multiProcessorCount, launches - 10);
  for (int grid : {2, prop.multiProcessorCount})
    for (int bytes : {7 * 1024 + 16, 57 * 1024}) {
      run<true>(bytes, grid, launches);
      run<false>(bytes, grid, launches);
    }
  return 0;
}
