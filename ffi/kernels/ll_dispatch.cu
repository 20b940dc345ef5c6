// LL dispatch: one kernel, three phases, every block co-resident (grid <= SMs).
//  send:    block per token; claim a slot per destination expert (atomic on
//           this GPU), cast to fp8 if asked, store the message straight into
//           the peer's receive slot (memory/self) or stage it and push a put
//           (port); then count the token as finished for that expert.
//  publish: block per expert; once every token for it is finished, send the
//           count as -count-1 (so 0 means "not yet") with a signed atomicAdd.
//  receive: block per local expert; wait for the R counts, lay the source
//           blocks out back to back, copy rows, src_info and scales out.
// Signal words of the previous call's half are cleared by the thread that
// signals the peer that writes them (ll_clean_prev): the peer only reuses
// that half after it has seen this call's signal from us, so the clear
// always lands first. The half flips on the device (ll_finish_call).
// Weighted mode (slot_weights set) is combine's backward: see LlDispatchArgs.
#include <cuda_bf16.h>

#include "kernels/ll_args.cuh"
#include "kernels/ll_fp8.cuh"

namespace jmep {
namespace {

constexpr int kThreads = 512;

// Local spin on an int32 counter that other blocks of this kernel advance.
__device__ bool ll_wait_local_eq(const int32_t* p, int32_t want, const WaitSite& site) {
  int32_t v;
  uint64_t start = 0;
  for (uint32_t it = 0;; ++it) {
    asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    if (v == want) return true;
    if (it == 0) start = globaltimer_ns();
    else if (it % kLlPollEvery == 0 && ll_wait_expired(start, v, site)) return false;
  }
}

__global__ void __launch_bounds__(kThreads, 1) ll_dispatch_kernel(const LlDispatchArgs a) {
  const LlStatic& s = a.s;
  const LlLayout& L = s.layout;
  __shared__ int s_dst[kLlMaxTopk];
  __shared__ int s_exp[kLlMaxTopk];
  __shared__ long long s_off[kLlMaxTopk];
  __shared__ float s_wt[kLlMaxTopk];
  __shared__ int s_hist[kLlMaxExperts];  // messages per destination expert (publish)
  __shared__ char* s_pbase[kLlMaxRanks];
  __shared__ int s_kind[kLlMaxRanks];
  __shared__ int s_cnt[kLlMaxRanks];
  __shared__ int s_base[kLlMaxRanks + 1];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  const int H = s.hidden, M = s.max_tokens, R = s.nranks, E = s.num_experts;
  const int LE = s.local_experts, K = a.topk, T = a.num_tokens;
  int32_t seq;
  if (!ll_begin_call(s.state, &seq)) return;  // Buffer closed: a replay after close does nothing
  const int half = seq & 1, prev = half ^ 1;
  if (a.phases & kLlPhaseSend) ll_mark_start(s.state);
  for (int p = tid; p < R; p += blockDim.x) {
    s_pbase[p] = s.peers[p].base;
    s_kind[p] = s.peers[p].kind;
  }
  const int send_tokens = (a.phases & kLlPhaseSend) ? T : 0;
  const int send_experts = (a.phases & kLlPhaseSend) ? E : 0;
  const int recv_experts = (a.phases & kLlPhaseRecv) ? LE : 0;
  const int64_t payload = a.use_fp8 ? H + (H / kLlFp8Block) * 4 : 2 * H;
  const int64_t msg_bytes = kLlHeaderBytes + payload;
  const char* x = static_cast<const char*>(a.x);
  const bool weighted = a.slot_weights != nullptr;
  __syncthreads();
  ll_probe(s.state, 0);  // every block running

  // ---------------------------------------------------------------- send
  for (int t = blockIdx.x; t < send_tokens; t += gridDim.x) {
    // The token's row goes to registers first, so its load overlaps the slot
    // claims below (kThreads threads cover H <= 8192: one 16-channel chunk
    // each for fp8, at most two 8-channel vectors each for bf16).
    const uint4* xrow = reinterpret_cast<const uint4*>(x + int64_t(t) * H * 2);
    uint4 pre0 = make_uint4(0u, 0u, 0u, 0u), pre1 = pre0;
    const int nvec = a.use_fp8 ? H / 16 : H / 8;  // fp8: chunks of two vectors
    if (tid < nvec) {
      pre0 = __ldg(xrow + (a.use_fp8 ? 2 * tid : tid));
      pre1 = a.use_fp8 ? __ldg(xrow + 2 * tid + 1)
                       : (tid + kThreads < nvec ? __ldg(xrow + tid + kThreads) : pre1);
    }
    if (warp == 0) {
      // Lane k holds slot k's expert; duplicates and weight sums come from
      // shuffles (one load of the row's indices, no re-reads).
      const int64_t e = lane < K ? ll_load_idx(a.topk_idx, int64_t(t) * K + lane, a.idx64) : -2;
      const float wk = weighted && lane < K ? a.slot_weights[int64_t(t) * K + lane] : 0.f;
      bool dup = false;  // one message per (token, expert): only the first slot sends
      float w = 0.f;     // weighted: the expert's weight, all of its slots in slot order
      for (int k2 = 0; k2 < K; ++k2) {
        const int64_t o = __shfl_sync(0xffffffffu, e, k2);
        const float ow = __shfl_sync(0xffffffffu, wk, k2);
        dup |= k2 < lane && o == e;
        if (o == e) w = __fadd_rn(w, ow);
      }
      if (lane < K) {
        int dst = -1;
        long long off = 0;
        if (e >= 0 && e < E) {
          if (!dup) {
            const int slot = atomicAdd(&s.slot_ctr[e], 1);
            dst = static_cast<int>(e / LE);
            off = L.dispatch_slot(half, e % LE, s.rank, slot, R, M);
            if (weighted) s_wt[lane] = w;
          }
        } else if (e != -1 && !weighted) {  // the forward dispatch already counted it
          atomicAdd(&s.state->dropped, 1);
        }
        s_dst[lane] = dst;
        s_exp[lane] = static_cast<int>(e);
        s_off[lane] = off;
      }
    }
    __syncthreads();
    bool any_port = false;
    for (int k = 0; k < K; ++k) any_port |= s_dst[k] >= 0 && s_kind[s_dst[k]] == kLlPort;
    char* staged = s.local + L.half_base(half) + L.send_off + int64_t(t) * L.dispatch_msg;

    // Store 16 bytes at byte `at` of the message to every destination.
    auto store_all = [&](int64_t at, const uint4& v) {
      for (int k = 0; k < K; ++k) {
        const int p = s_dst[k];
        if (p < 0 || s_kind[p] == kLlPort) continue;
        *reinterpret_cast<uint4*>(s_pbase[p] + s_off[k] + at) = v;
      }
      if (any_port) *reinterpret_cast<uint4*>(staged + at) = v;
    };
    const uint4 header = make_uint4(static_cast<unsigned>(t), 0u, 0u, 0u);
    if (!weighted) {
      if (tid == 0) store_all(0, header);
    } else {
      // Per destination header: token and that expert's weight (bytes 8..11).
      // Port peers share the staged copy, whose weight word stays 0: an add
      // pushed after the put fills it in (the proxy keeps push order).
      if (tid == 0 && any_port) *reinterpret_cast<uint4*>(staged) = header;
      if (tid < K && s_dst[tid] >= 0 && s_kind[s_dst[tid]] != kLlPort)
        *reinterpret_cast<uint4*>(s_pbase[s_dst[tid]] + s_off[tid]) =
            make_uint4(static_cast<unsigned>(t), 0u, __float_as_uint(s_wt[tid]), 0u);
    }
    if (a.use_fp8) {
      // Chunk c = tid: 16 channels a thread, 8 threads (one warp's lanes) per
      // 128-channel scale block.
      {
        const int c = tid;
        const bool active = c < nvec;
        float f[16];
        float amax = 0.f;
        if (active) {
          ll_bf16x16_to_float(pre0, pre1, f);
#pragma unroll
          for (int i = 0; i < 16; ++i) amax = fmaxf(amax, fabsf(f[i]));
        }
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 4));
        if (active) {
          float mul, sinv;
          ll_fp8_scale(amax, a.round_scale, &mul, &sinv);
          store_all(kLlHeaderBytes + int64_t(c) * 16, ll_float16_to_e4m3(f, mul));
          if ((c & 7) == 0) {
            const int64_t at = kLlHeaderBytes + H + int64_t(c >> 3) * 4;
            for (int k = 0; k < K; ++k) {
              const int p = s_dst[k];
              if (p < 0 || s_kind[p] == kLlPort) continue;
              *reinterpret_cast<float*>(s_pbase[p] + s_off[k] + at) = sinv;
            }
            if (any_port) *reinterpret_cast<float*>(staged + at) = sinv;
          }
        }
      }
    } else {
      if (tid < nvec) store_all(kLlHeaderBytes + int64_t(tid) * 16, pre0);
      if (tid + kThreads < nvec) store_all(kLlHeaderBytes + int64_t(tid + kThreads) * 16, pre1);
    }
    if (any_port) __threadfence_system();  // staged bytes visible to the proxy's copy
    __syncthreads();
    if (tid < K && s_dst[tid] >= 0) {
      const int p = s_dst[tid];
      if (s_kind[p] == kLlPort) {
        ll_port_put(s.handles, p, s_off[tid], staged - s.local, msg_bytes);
        if (weighted)
          ll_port_add(s.handles, p, s_off[tid] + 8,
                      static_cast<int64_t>(__float_as_uint(s_wt[tid])));
      }
      ll_release_add_gpu(&s.finish_ctr[s_exp[tid]], 1);  // this token is out for that expert
    }
    __syncthreads();
  }

  ll_probe(s.state, 1);  // tokens sent
  // ---------------------------------------------------------------- publish counts
  // A warp per expert (one round for E <= 16 * grid); the blocks that own
  // experts first count each expert's messages into shared memory (every
  // distinct in-range expert of a token once, as the send phase does).
  const int first_expert = blockIdx.x * nwarps;
  if (first_expert < send_experts) {
    for (int e = tid; e < E; e += blockDim.x) s_hist[e] = 0;
    __syncthreads();
    for (int t = tid; t < T; t += blockDim.x) {
      int64_t ev[kLlMaxTopk];
#pragma unroll
      for (int k = 0; k < kLlMaxTopk; ++k) {
        if (k >= K) break;
        ev[k] = ll_load_idx(a.topk_idx, int64_t(t) * K + k, a.idx64);
        bool fresh = ev[k] >= 0 && ev[k] < E;
#pragma unroll
        for (int k2 = 0; k2 < k; ++k2) fresh &= ev[k2] != ev[k];
        if (fresh) atomicAdd(&s_hist[ev[k]], 1);
      }
    }
    __syncthreads();
  }
  for (int e = first_expert + warp; e < send_experts; e += gridDim.x * nwarps) {
    if (lane == 0) {
      const int expected = s_hist[e];
      const int p = e / LE, j = e % LE;
      const WaitSite site{s.error, s.timeout_ns, s.rank, p, kPhaseDispatchSend};
      ll_wait_local_eq(&s.finish_ctr[e], expected, site);
      s.finish_ctr[e] = 0;  // every claim for e is done: ready for the next call
      s.slot_ctr[e] = 0;
      ll_clean_prev(s, prev, j, p);
      // Data (and the clears) before the count: the senders' release-adds were
      // acquired above, so the count's release covers their stores.
      const int64_t at = L.dispatch_counter(half, j, s.rank, R);
      const int64_t delta = -static_cast<int64_t>(expected) - 1;
      if (s_kind[p] == kLlPort) {
        __threadfence_system();
        ll_port_add(s.handles, p, at, delta);
      } else {
        ll_direct_add(s_pbase[p], at, delta);
      }
    }
  }

  __syncthreads();
  if (a.phases & kLlPhaseSend) ll_mark_send_end(s.state);
  ll_probe(s.state, 2);  // counts published

  // ---------------------------------------------------------------- receive
  for (int j = blockIdx.x; j < recv_experts; j += gridDim.x) {
    for (int r = tid; r < R; r += blockDim.x) {
      const WaitSite site{s.error, s.timeout_ns, s.rank, r, kPhaseDispatchRecv};
      const int64_t v = ll_wait_signal(s.local + L.dispatch_counter(half, j, r, R),
                                       [](int64_t w) { return w != 0; }, site);
      int cnt = v < 0 ? static_cast<int>(-v - 1) : 0;
      s_cnt[r] = cnt > M ? M : cnt;
    }
    __syncthreads();
    if (tid == 0) {
      int off = 0;
      for (int r = 0; r < R; ++r) {
        s_base[r] = off;
        if (!weighted)
          a.layout_range[int64_t(j) * R + r] =
              (static_cast<int64_t>(off) << 32) | static_cast<uint32_t>(s_cnt[r]);
        off += s_cnt[r];
      }
      s_base[R] = off;
      if (!weighted) {
        a.recv_count[j] = off;
        a.stats_out[j] = a.stats_in[j] + off;
      }
    }
    __syncthreads();
    const int total = s_base[R];
    if (weighted) {  // rows past the block hold no (token, expert): gradient 0
      for (int row = total + warp; row < R * M; row += nwarps) {
        uint4* d = reinterpret_cast<uint4*>(static_cast<char*>(a.recv_x) +
                                            (int64_t(j) * R * M + row) * H * 2);
        for (int c = lane; c < H / 8; c += 32) d[c] = make_uint4(0u, 0u, 0u, 0u);
      }
    }
    for (int row = warp; row < total; row += nwarps) {
      int r = 0;
      while (row >= s_base[r + 1]) ++r;
      const char* src = s.local + L.dispatch_slot(half, j, r, row - s_base[r], R, M);
      const int tok = __ldcg(reinterpret_cast<const int*>(src));
      const uint4* body = reinterpret_cast<const uint4*>(src + kLlHeaderBytes);
      if (weighted) {
        // The forward handle's row for (r, tok); a token that handle lacks is skipped.
        const int mr = tok >= 0 && tok < M ? a.row_map[(int64_t(j) * R + r) * M + tok] : -1;
        if (mr < 0 || mr >= R * M) continue;
        const float w = __ldcg(reinterpret_cast<const float*>(src + 8));
        uint4* d = reinterpret_cast<uint4*>(static_cast<char*>(a.recv_x) +
                                            (int64_t(j) * R * M + mr) * H * 2);
        for (int c = lane; c < H / 8; c += 32) {
          const uint4 v = __ldcg(body + c);
          const __nv_bfloat162* h2 = reinterpret_cast<const __nv_bfloat162*>(&v);
          uint4 o;
          __nv_bfloat162* o2 = reinterpret_cast<__nv_bfloat162*>(&o);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const float2 f = __bfloat1622float2(h2[i]);
            o2[i] = __floats2bfloat162_rn(__fmul_rn(f.x, w), __fmul_rn(f.y, w));
          }
          d[c] = o;
        }
        continue;
      }
      const int64_t out_row = int64_t(j) * R * M + row;
      if (lane == 0) a.src_info[out_row] = tok;
      if (a.use_fp8) {
        uint4* d = reinterpret_cast<uint4*>(static_cast<char*>(a.recv_x) + out_row * H);
        ll_warp_copy<true>(d, body, H / 16, lane);
        const float* sc = reinterpret_cast<const float*>(src + kLlHeaderBytes + H);
        const int ns = H / kLlFp8Block;
        for (int c = lane; c < ns; c += 32) a.recv_scales[out_row * ns + c] = __ldcg(sc + c);
      } else {
        uint4* d = reinterpret_cast<uint4*>(static_cast<char*>(a.recv_x) + out_row * H * 2);
        ll_warp_copy<true>(d, body, H / 8, lane);
      }
    }
    __syncthreads();
  }

  ll_probe(s.state, 3);  // rows received
  if (blockIdx.x == 0 && tid == 0) *a.order_out = *a.order_in;
  if (a.phases & kLlPhaseRecv) ll_finish_call(s.state, seq, 0);
}

__global__ void ll_peers_init_kernel(ChannelDeviceHandle* h, char* local, LlPeer* peers, int n) {
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= n) return;
  const int kind = h[p].kind;
  peers[p].kind = kind;
  peers[p].pad = 0;
  peers[p].base = kind == kLlSelf ? local
                  : kind == kLlMemory ? (char*)(h[p].mem.remote_ptr(0))
                                      : nullptr;
}

}  // namespace

// Loads the kernel on the current device now: with CUDA lazy loading the first
// launch would otherwise load it mid-run, next to kernels spinning on peers.
cudaError_t ll_preload_dispatch() {
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, ll_dispatch_kernel);
}

void ll_launch_dispatch(const LlDispatchArgs& a, int num_blocks, cudaStream_t stream) {
  ll_dispatch_kernel<<<num_blocks, kThreads, 0, stream>>>(a);
}

void ll_launch_peers_init(ChannelDeviceHandle* handles, char* local, LlPeer* peers, int nranks,
                          cudaStream_t stream) {
  ll_peers_init_kernel<<<(nranks + 63) / 64, 64, 0, stream>>>(handles, local, peers, nranks);
}

}  // namespace jmep
