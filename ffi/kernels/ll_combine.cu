// LL combine: the mirror of dispatch, one kernel, all blocks co-resident.
//  send:    pairs (local expert j, source rank r) spread over the blocks, a
//           few per pass: each row of a pair's block [offset, offset+count)
//           goes back to r's slot (expert, token) — a direct NVLink store, or
//           staged + put for port peers — then one flag add tells r that
//           expert j's rows for it are all there.
//  receive: block per token; wait for the flags of its experts, then
//           out[t] = sum_k w[t,k] * row(t, e_k), f32 accumulation, one bf16
//           rounding (same order of operations as the reference: mul, add).
//           Per-slot mode (combine's backward w.r.t. the weights) copies each
//           slot's row to out[t, k] instead of reducing.
#include <cuda_bf16.h>

#include "kernels/ll_args.cuh"
#include "kernels/ll_mask.cuh"

namespace jmep {
namespace {

constexpr int kThreads = 512;
constexpr int kGroup = 2;  // (expert, rank) pairs a block sends in one pass (wider: slower code)

#ifndef JMEP_LL_MAX_REDUCE_SPLIT
#define JMEP_LL_MAX_REDUCE_SPLIT 8  // -DJMEP_LL_MAX_REDUCE_SPLIT=1: one block per token at every T
#endif
static_assert((JMEP_LL_MAX_REDUCE_SPLIT & (JMEP_LL_MAX_REDUCE_SPLIT - 1)) == 0,
              "a power of two (ll_reduce_split)");

// Blocks per token in the reduce (RG): with fewer tokens than blocks, RG
// blocks share a token's output, each reducing a column range of its K rows.
// One token's rows are K x 2H bytes (114 KB at H = 7168, K = 8), more than one
// SM loads quickly: at T = 1 the phase probes put ~2.9 us between the last
// flag seen and the token reduced on one block. Each of the RG blocks waits for
// the token's K flags itself (its own acquires), so no ordering changes.
// RG is a power of two (ll_split_shift): returns log2 RG.
__device__ __forceinline__ int ll_reduce_split(int tokens, int grid) {
  return ll_split_shift(tokens, grid, ll_log2_floor(JMEP_LL_MAX_REDUCE_SPLIT));
}

// One instance per mode (reduce; per-slot copy for the backward; the reduce
// that discards its slots, ll_discard.cuh): each carries only its own receive
// path (code size is latency at small T: ll_dispatch.cu; with the discards
// compiled in but not taken, T = 1 combine took 0.5 us longer on the H200).
template <bool kPerSlot, bool kDiscard>
__global__ void __launch_bounds__(kThreads, 1)
    ll_combine_kernel(const __grid_constant__ LlCombineArgs a) {
  const LlStatic& s = a.s;
  const LlLayout& L = s.layout;
  ll_probe_entry(s.state);
  const LlStateRead st0 = ll_read_state(s.state);  // used below, once the loads it overlaps are out
  __shared__ int s_exp[kLlMaxTopk];
  __shared__ float s_w[kLlMaxTopk];

  constexpr int nwarps = kThreads / 32;  // the launch is always kThreads wide (shifts below)
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int H = s.hidden, M = s.max_tokens, R = s.nranks, E = s.num_experts;
  const int LE = s.local_experts, K = a.topk, T = a.num_tokens;
  // The first token's expert ids and weights, requested before anything else
  // (XLA's buffers stay valid even when the Buffer was closed).
  const int rsh = kPerSlot ? 0 : ll_reduce_split(T, gridDim.x), RG = 1 << rsh;
  int64_t e_first = -1;
  float w_first = 0.f;
  if (tid < K && blockIdx.x < T * RG && (a.phases & kLlPhaseRecv)) {
    const int t0 = blockIdx.x >> rsh;
    e_first = ll_load_idx(a.topk_idx, int64_t(t0) * K + tid, a.idx64);
    if (!kPerSlot) w_first = a.topk_weights[int64_t(t0) * K + tid];
  }
  const int send_blocks = (a.phases & kLlPhaseSend) ? LE * R : 0;
  // The first pass's handle entries too: its row offsets (then the rows' token
  // ids and bytes) are the send's chain of dependent loads.
  int64_t lr_first[kGroup];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    const int q = blockIdx.x + g * gridDim.x;
    lr_first[g] = q < send_blocks ? a.layout_range[q] : 0;
  }
  // Block 0 passes the order token on at its end: loaded now, not then.
  const int32_t order = blockIdx.x == 0 && tid == 0 ? *a.order_in : 0;
  int32_t seq;
  LlCallMask mask;
  // Buffer closed: a replay after close does nothing.
  if (!ll_begin_call(s.state, st0, s.rank, &seq, &mask)) return;
  if (tid == 0) ll_probe_at(s.state, 8);  // the state read returned (last block)
  const long long tseg = ll_probe_clock();  // segment probes (cycles, per warp)
  const int half = seq & 1, prev = half ^ 1;
  if (a.phases & kLlPhaseSend) ll_mark_start(s.state, seq);
  const int recv_tokens = (a.phases & kLlPhaseRecv) ? T : 0;
  ll_reset_next_slots(s, seq);
  const int nvec = H / 8;  // 16-byte vectors per bf16 row
  const int64_t row_bytes = int64_t(H) * 2;
  const char* y = static_cast<const char*>(a.y);
  ll_probe(s.state, 0);  // every block running

  // ---------------------------------------------------------------- send
  // A block takes its pairs (j, r) q = blockIdx.x + i * gridDim.x up to
  // kGroup at a time and copies all their rows in one pass: a pass per pair
  // would wait out the handle loads and the copy's latency once per pair.
  for (int q0 = blockIdx.x; q0 < send_blocks; q0 += gridDim.x * kGroup) {
    // Every thread reads the group's handle entries itself (broadcast loads,
    // all in flight at once): no barrier before the copy.
    int64_t lr[kGroup];
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      const int q = q0 + g * gridDim.x;
      lr[g] = q0 == static_cast<int>(blockIdx.x) ? lr_first[g]
              : q < send_blocks                   ? a.layout_range[q]
                                                  : 0;
    }
    int first[kGroup + 1];
    bool any_port = false;
    first[0] = 0;
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      const int q = q0 + g * gridDim.x;
      const int off = static_cast<int>(lr[g] >> 32);
      int cnt = static_cast<int>(lr[g] & 0xffffffff);
      // A handle from elsewhere must not make us write out of bounds.
      if (q >= send_blocks || cnt < 0 || off < 0 || cnt > M || off > R * M - cnt) cnt = 0;
      const int qr = s.div_ranks.mod(q);
      if (q < send_blocks && !mask.reachable(qr)) cnt = 0;  // a masked rank gets no rows
      first[g + 1] = first[g] + cnt;
      any_port |= q < send_blocks && s.peer_kind[qr] == kLlPort;
    }
    const int nrows = first[kGroup];
    // Row i of the pass: its pair g, that pair's q and its handle row.
    auto locate = [&](int i, int* q, int64_t* row) {
      int g = 0;
#pragma unroll
      for (int h = 1; h < kGroup; ++h) g += i >= first[h];
      int64_t l = 0;
      int f = 0;
#pragma unroll
      for (int h = 0; h < kGroup; ++h)
        if (h == g) l = lr[h], f = first[h];
      *q = q0 + g * gridDim.x;
      *row = int64_t(s.div_ranks.div(*q)) * R * M + static_cast<int>(l >> 32) + (i - f);
    };
    // Rows are few per pair (T*K/E on average): split each row over several
    // warps so the whole block copies (nwarps / nrows rounded down to a power
    // of two: shifts, not divisions).
    const int ssh = nrows > 0 && nrows < nwarps ? ll_log2_floor(nwarps) - ll_log2_ceil(nrows) : 0;
    const int split = 1 << ssh;
    const int per = (nvec + split - 1) >> ssh;
    for (int wi = warp; wi < nrows << ssh; wi += nwarps) {
      const int i = wi >> ssh, c0 = (wi & (split - 1)) * per;
      const int n = min(per, nvec - c0);
      int q;
      int64_t row;
      locate(i, &q, &row);
      const int j = s.div_ranks.div(q), r = q - j * R;
      if (n <= 0) continue;
      const int tok = a.src_info[row];
      const uint4* src = reinterpret_cast<const uint4*>(y + row * row_bytes) + c0;
      long long tw = tseg;
      // The row's token id picks the destination; its bytes load meanwhile.
      ll_warp_copy_late<false>(src, n, lane, [&]() -> uint4* {
        ll_probe_after(s.state, 9, tok);  // the row's token id arrived (its loads in flight)
        ll_probe_seg_after(s.state, 13, &tw, tok);  // state read -> token id in
        if (tok < 0 || tok >= M) return nullptr;
        char* base = s.peer_kind[r] == kLlPort
                         ? s.local + L.half_base(half) + L.send_off + row * L.combine_msg
                         : s.peer_base[r] + L.combine_slot(half, s.rank * LE + j, tok, M);
        return reinterpret_cast<uint4*>(base) + c0;
      });
      ll_probe_seg(s.state, 14, &tw);  // -> the row's stores issued
    }
    if (any_port) {
      __threadfence_system();  // staged rows visible to the proxy's copy engine
      __syncthreads();
      for (int i = tid; i < nrows; i += blockDim.x) {
        int q;
        int64_t row;
        locate(i, &q, &row);
        const int j = s.div_ranks.div(q), r = q - j * R;
        if (s.peer_kind[r] != kLlPort) continue;
        const int tok = a.src_info[row];
        if (tok < 0 || tok >= M) continue;
        ll_port_put(s.handles, r, L.combine_slot(half, s.rank * LE + j, tok, M),
                    L.half_base(half) + L.send_off + row * L.combine_msg, row_bytes);
      }
    }
    __syncthreads();
    if (tid < kGroup && q0 + tid * gridDim.x < send_blocks) {
      const int q = q0 + tid * gridDim.x, j = s.div_ranks.div(q), r = q - j * R;
      ll_clean_prev(s, prev, j, r);  // for a masked peer too (clean if it is unmasked)
      // Rows (the block's, ordered by the __syncthreads) and the clears before
      // the flag: a release add for direct peers, a fence before the proxy's.
      const int64_t flag = L.combine_flag(half, s.rank * LE + j, E);
      ll_probe_at(s.state, 4);  // a flag's add begins
      if (mask.reachable(r)) ll_signal_add(s, r, flag, 1, true);
      ll_probe_at(s.state, 5);  // ... and returned (the release fence waited for the rows)
      long long ta = tseg;
      ll_probe_seg(s.state, 15, &ta);  // state read -> flag add returned
    }
  }

  // One thread of the last block (at small T it has no rows to send).
  if ((a.phases & kLlPhaseSend) && blockIdx.x == gridDim.x - 1 && tid == blockDim.x - 32)
    ll_fold_timing(s.state, seq);
  __syncthreads();
  if (a.phases & kLlPhaseSend) ll_mark_send_end(s.state, seq);
  ll_probe(s.state, 1);  // rows sent, flags added

  // ---------------------------------------------------------------- receive + reduce
  // Unit u: vectors [lo, hi) of token u / RG's output (RG == 1: the whole row).
  const int units = recv_tokens << rsh, per = (nvec + RG - 1) >> rsh;
  constexpr bool discard = kLlDiscardCombine && kDiscard;  // slots dropped from the L2 once read
  for (int u = blockIdx.x; u < units; u += gridDim.x) {
    const int t = u >> rsh, lo = (u & (RG - 1)) * per, hi = min(nvec, lo + per);
    long long tr = ll_probe_clock();
    if (tid < K) {
      const bool first = u == static_cast<int>(blockIdx.x);
      const int64_t e = first ? e_first : ll_load_idx(a.topk_idx, int64_t(t) * K + tid, a.idx64);
      int ok = -1;
      // A masked owner's slot, or one whose owner was lost during this wait,
      // contributes zero; the token's other slots still reduce.
      const int owner = e >= 0 && e < E ? s.div_local_experts.div(static_cast<int>(e)) : -1;
      if (owner >= 0 && mask.reachable(owner)) {
        const int64_t v = ll_wait_peer(s, s.local + L.combine_flag(half, e, E),
                                       [](int64_t w) { return w > 0; }, owner, kPhaseCombineRecv);
        if (v != 0) ok = static_cast<int>(e);
        ll_probe_at(s.state, 6);  // a token's flag seen
      }
      s_exp[tid] = ok;
      s_w[tid] = kPerSlot ? 0.f : first ? w_first : a.topk_weights[int64_t(t) * K + tid];
    }
    __syncthreads();
    if (warp == 0) ll_probe_at(s.state, 10);  // the token's flags seen: the reduce starts
    if (warp == 0) ll_probe_seg(s.state, 16, &tr);  // receive start -> the token's flags seen
    if (kPerSlot) {
      uint4* out = reinterpret_cast<uint4*>(static_cast<char*>(a.out) + int64_t(t) * K * row_bytes);
      for (int i = tid; i < K * nvec; i += blockDim.x) {
        const int k = i / nvec, c = i % nvec, e = s_exp[k];
        out[i] = e < 0 ? make_uint4(0u, 0u, 0u, 0u)
                       : __ldcg(reinterpret_cast<const uint4*>(
                                    s.local + L.combine_slot(half, e, t, M)) + c);
      }
      __syncthreads();
      continue;
    }
    uint4* out = reinterpret_cast<uint4*>(static_cast<char*>(a.out) + int64_t(t) * row_bytes);
    // Two columns a thread (c0 and c0 + blockDim.x: a 7168-channel row is 896
    // vectors) and eight slots at a time: sixteen loads issued together, then
    // added in slot order, one memory latency per round. The loop is
    // warp-uniform (a lane past hi loads nothing) for the discards' __syncwarp.
    for (int c0 = lo + tid; c0 - (discard ? lane : 0) < hi; c0 += 2 * blockDim.x) {
      const int c1 = c0 + blockDim.x;
      float acc[2][8];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[0][i] = acc[1][i] = 0.f;
      for (int k0 = 0; k0 < K; k0 += 8) {
        uint4 v[2][8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const int e = k0 + u < K ? s_exp[k0 + u] : -1;
          const uint4* row =
              reinterpret_cast<const uint4*>(s.local + L.combine_slot(half, e < 0 ? 0 : e, t, M));
          v[0][u] = e < 0 || (discard && c0 >= hi) ? make_uint4(0u, 0u, 0u, 0u) : __ldcg(row + c0);
          v[1][u] = e < 0 || c1 >= hi ? make_uint4(0u, 0u, 0u, 0u) : __ldcg(row + c1);
        }
        if (warp == 0 && k0 == 0 && c0 == lo + tid)
          ll_probe_after(s.state, 11, static_cast<int>(v[0][0].x));  // the first loads landed
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          if (k0 + u >= K || s_exp[k0 + u] < 0) continue;
          const float w = s_w[k0 + u];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const __nv_bfloat162* h2 = reinterpret_cast<const __nv_bfloat162*>(&v[h][u]);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const float2 f = __bfloat1622float2(h2[i]);
              acc[h][2 * i] = __fadd_rn(acc[h][2 * i], __fmul_rn(f.x, w));
              acc[h][2 * i + 1] = __fadd_rn(acc[h][2 * i + 1], __fmul_rn(f.y, w));
            }
          }
        }
        // The round's slot lines are dead (ll_discard.cuh): the adds used every
        // load. Lanes l..l+7 read a 128-aligned line starting at lane l's vector.
        if constexpr (discard) {
          __syncwarp();
#pragma unroll
          for (int u = 0; u < 8; ++u) {
            const int e = k0 + u < K ? s_exp[k0 + u] : -1;
            if (e < 0) continue;
            const uint4* row = reinterpret_cast<const uint4*>(s.local + L.combine_slot(half, e, t, M));
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int c = h == 0 ? c0 : c1;
              if (lane <= 24 && c + 7 < hi && (reinterpret_cast<uintptr_t>(row + c) & 127) == 0)
                ll_discard_line(row + c);
            }
          }
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int c = h == 0 ? c0 : c1;
        if (c >= hi) continue;
        uint4 o;
        __nv_bfloat162* o2 = reinterpret_cast<__nv_bfloat162*>(&o);
#pragma unroll
        for (int i = 0; i < 4; ++i) o2[i] = __floats2bfloat162_rn(acc[h][2 * i], acc[h][2 * i + 1]);
        out[c] = o;
      }
    }
    ll_probe_at(s.state, 7);  // a thread's part of the token reduced
    if (warp == 0) ll_probe_seg(s.state, 17, &tr);  // -> warp 0's part reduced, stored
    __syncthreads();
  }

  ll_probe(s.state, 2);  // tokens reduced
  // Wait for every expert's flag, not only those our tokens use: each flag is
  // added after its sender cleared the counter we write in the next dispatch,
  // so a rank whose tokens skip some experts cannot run ahead into the next
  // dispatch and have its count wiped by that late clear. Any block's acquire
  // will do (the next kernel starts after every block ends), so the blocks
  // without a reduce unit wait, while the others reduce (at T = 1, 124 of
  // 132: a round trip off the reducing blocks' tail); with none idle, all share it.
  const LlIdleBlocks waiters = ll_idle_blocks(units);
  for (int e = waiters.first(tid); waiters.mine && e < (a.phases & kLlPhaseRecv ? E : 0);
       e += waiters.stride()) {
    const int owner = s.div_local_experts.div(e);
    if (mask.reachable(owner))
      ll_wait_peer(s, s.local + L.combine_flag(half, e, E), [](int64_t w) { return w > 0; }, owner,
                   kPhaseCombineRecv);
  }

  ll_probe(s.state, 3);  // every flag seen
  long long te = tseg;
  if (warp == 0) ll_probe_seg(s.state, 18, &te);  // state read -> every flag seen (any block)
  if (blockIdx.x == 0 && tid == 0) *a.order_out = order;
  if (a.phases & kLlPhaseRecv) ll_finish_call(s.state, seq, 1);
}

}  // namespace

cudaError_t ll_preload_combine() {
  cudaFuncAttributes attr;
  cudaError_t e = cudaFuncGetAttributes(&attr, ll_combine_kernel<false, false>);
  if (e == cudaSuccess) e = cudaFuncGetAttributes(&attr, ll_combine_kernel<true, false>);
#if JMEP_LL_DISCARD & 2  // the discarding instance exists only in a build with combine discards
  if (e == cudaSuccess) e = cudaFuncGetAttributes(&attr, ll_combine_kernel<false, true>);
#endif
  return e;
}

void ll_launch_combine(const LlCombineArgs& a, int num_blocks, cudaStream_t stream) {
  if (a.per_slot) {
    ll_combine_kernel<true, false><<<num_blocks, kThreads, 0, stream>>>(a);
    return;
  }
#if JMEP_LL_DISCARD & 2
  if (a.discard) {
    ll_combine_kernel<false, true><<<num_blocks, kThreads, 0, stream>>>(a);
    return;
  }
#endif
  ll_combine_kernel<false, false><<<num_blocks, kThreads, 0, stream>>>(a);
}

}  // namespace jmep
