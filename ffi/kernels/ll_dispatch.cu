// LL dispatch: one kernel, two phases, every block co-resident (grid <= SMs).
//  count:   every block counts each destination expert's messages (its
//           distinct in-range experts per token) into shared memory, while its
//           first token's row is loading.
//  send:    block per token, or at small T a token's messages spread over
//           G blocks (ll_send_split); claim a slot per destination expert (atomic on
//           this GPU; at T <= kDirectSlotsMaxT counted from the earlier tokens'
//           ids), cast to fp8 if asked, store the message straight into the
//           peer's receive slot (memory/self) or stage it and push a put
//           (port); then one atomic add per message on the destination's count
//           word, released after the message (ll_count_delta: the slot-0
//           message also carries the total), and, for an expert no token of
//           ours goes to, one add saying "none" (a block per expert). No block
//           waits for another: the receiver learns the count from the adds.
//  receive: block per local expert; wait for the R count words, lay the source
//           blocks out back to back, copy rows, src_info and scales out.
// Signal words of the previous call's half are cleared by the thread that
// first signals the peer that writes them (ll_clean_prev): the peer only
// reuses that half after it has seen this call's signal from us, so the clear
// always lands first. The half flips on the device (ll_finish_call).
// Weighted mode (slot_weights set) is combine's backward: see LlDispatchArgs.
#include <cuda_bf16.h>

#include "kernels/ll_args.cuh"
#include "kernels/ll_fp8.cuh"
#include "kernels/ll_mask.cuh"

namespace jmep {
namespace {

constexpr int kThreads = 512;
#ifndef JMEP_LL_MAX_SPLIT
#define JMEP_LL_MAX_SPLIT 8  // -DJMEP_LL_MAX_SPLIT=1: one block per token at every T
#endif
static_assert((JMEP_LL_MAX_SPLIT & (JMEP_LL_MAX_SPLIT - 1)) == 0, "a power of two (ll_send_split)");

// Up to this many tokens a message's slot comes from the ids (claim), above
// it from an atomic claim on slot_ctr. -DJMEP_LL_DIRECT_SLOTS_MAX_T=0: always atomic.
#ifndef JMEP_LL_DIRECT_SLOTS_MAX_T
#define JMEP_LL_DIRECT_SLOTS_MAX_T 4
#endif
constexpr int kDirectSlotsMaxT = JMEP_LL_DIRECT_SLOTS_MAX_T;

// Blocks per token (G): with fewer tokens than blocks, G blocks share a token,
// each storing the direct messages k with k % G == its part. One block then
// stores a G-th of the token's bytes, and its release-adds wait for only
// those: at T = 1 (K = 8) that is 7 KB instead of 57 KB behind each fence.
// Port messages stay with the token's first block (part 0), which alone
// stages the token's bytes, so the staged copy has one writer. G is a power
// of two (ll_split_shift): returns log2 G.
__device__ __forceinline__ int ll_send_split(int tokens, int topk, int grid) {
  const int cap = min(ll_log2_floor(max(topk, 1)), ll_log2_floor(JMEP_LL_MAX_SPLIT));
  return ll_split_shift(tokens, grid, cap);
}

// One instance per mode (fp8 or bf16 forward; weighted, bf16): each carries
// only its own paths. Code size is latency here: at small T a call runs each
// instruction about once, so every cache line of code it touches is fetched
// on the critical path.
template <bool kFp8, bool kWeighted>
__global__ void __launch_bounds__(kThreads, 1)
    ll_dispatch_kernel(const __grid_constant__ LlDispatchArgs a) {
  const LlStatic& s = a.s;
  const LlLayout& L = s.layout;
  ll_probe_entry(s.state);
  const LlStateRead st0 = ll_read_state(s.state);  // used below, once the loads it overlaps are out
  __shared__ int s_dst[kLlMaxTopk];
  __shared__ int s_exp[kLlMaxTopk];
  __shared__ int s_slot[kLlMaxTopk];
  __shared__ long long s_off[kLlMaxTopk];
  __shared__ float s_wt[kLlMaxTopk];
  // The block's direct destinations of the current token, resolved once by the
  // claim: the store loops then run over these pointers (1 at T = 1, G = 8)
  // instead of testing K slots, each with two dependent constant-bank loads.
  // The staged copy (any port message) is the list's last entry.
  __shared__ char* s_ptr[kLlMaxTopk + 1];
  __shared__ int s_nptr;
  __shared__ bool s_any_port;
  __shared__ int s_hist[kLlMaxExperts];  // messages per destination expert (all tokens)

  // The launch is always kThreads wide (ll_launch_dispatch): a constant nwarps
  // makes the receive's warp split shifts.
  constexpr int nwarps = kThreads / 32;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int H = s.hidden, M = s.max_tokens, R = s.nranks, E = s.num_experts;
  const int LE = s.local_experts, K = a.topk, T = a.num_tokens;
  const int send_tokens = (a.phases & kLlPhaseSend) ? T : 0;
  // Send units: unit u is part u % G of token u / G (G == 1: a block per token).
  const int gsh = ll_send_split(send_tokens, K, gridDim.x), G = 1 << gsh;
  const int units = send_tokens << gsh;
  const int send_experts = (a.phases & kLlPhaseSend) ? E : 0;
  const int recv_experts = (a.phases & kLlPhaseRecv) ? LE : 0;
  const int nvec = kFp8 ? H / 16 : H / 8;  // fp8: chunks of two vectors
  const char* x = static_cast<const char*>(a.x);
  constexpr bool weighted = kWeighted;
  // A token's row goes to registers first, so its load overlaps the counting
  // and the slot claims (kThreads threads cover H <= 8192: one 16-channel chunk
  // each for fp8, at most two 8-channel vectors each for bf16). The first row
  // is requested before anything else: XLA's buffers stay valid even when the
  // Buffer was closed.
  uint4 pre0 = make_uint4(0u, 0u, 0u, 0u), pre1 = pre0;
  auto prefetch = [&](int t) {
    const uint4* xrow = reinterpret_cast<const uint4*>(x + int64_t(t) * H * 2);
    if (tid < nvec) {
      pre0 = __ldg(xrow + (kFp8 ? 2 * tid : tid));
      pre1 = kFp8 ? __ldg(xrow + 2 * tid + 1)
                       : (tid + kThreads < nvec ? __ldg(xrow + tid + kThreads) : pre1);
    }
  };
  auto ids = [&](int t, int64_t* e, float* wk) {
    *e = lane < K ? ll_load_idx(a.topk_idx, int64_t(t) * K + lane, a.idx64) : -2;
    *wk = weighted && lane < K ? a.slot_weights[int64_t(t) * K + lane] : 0.f;
  };
  int64_t e0 = -2;
  float w0 = 0.f;
  // Direct slots (T <= kDirectSlotsMaxT): lane k also loads slot k of every
  // earlier token, requested with its own ids.
  const bool direct = send_tokens <= kDirectSlotsMaxT;
  int64_t e_before[kDirectSlotsMaxT > 1 ? kDirectSlotsMaxT - 1 : 1];
  if (blockIdx.x < units) {
    const int t0 = blockIdx.x >> gsh;
    prefetch(t0);
    if (warp == 0) {
      ids(t0, &e0, &w0);
#pragma unroll
      for (int t2 = 0; t2 + 1 < kDirectSlotsMaxT; ++t2)
        e_before[t2] = direct && t2 < t0 && lane < K
                           ? ll_load_idx(a.topk_idx, int64_t(t2) * K + lane, a.idx64)
                           : -2;
    }
  }
  // Warps 1.. count (below), in passes of 32 / g tokens a warp (g = 8 lanes
  // a token when K <= 8, else 16), lane g h + k on slot k of the pass's token
  // h. Their first batch of passes (T <= 480 at K <= 8) is requested now, so
  // that round trip overlaps the state read's instead of following it.
  constexpr int kBatch = 8;
  const int cg = K <= 8 ? 8 : 16, cpw = 32 / cg;  // lanes a token, tokens a warp
  const int cw = warp - 1, ncw = nwarps - 1, ch = lane / cg, ck = lane % cg;
  auto count_token = [&](int pass) { return cpw * (cw + pass * ncw) + ch; };
  auto load_batch = [&](int b, LlIdParts (&id)[kBatch]) {
#pragma unroll
    for (int p = 0; p < kBatch; ++p) {
      const int t = count_token(b + p);
      ll_load_id_parts(a.topk_idx, int64_t(t) * K + ck, a.idx64,
                       (a.phases & kLlPhaseSend) && warp > 0 && t < T && ck < K, &id[p]);
    }
  };
  LlIdParts first_ids[kBatch];
  load_batch(0, first_ids);
  // Block 0 passes the order token on at its end: loaded now, not then.
  const int32_t order = blockIdx.x == 0 && tid == 0 ? *a.order_in : 0;
  int32_t seq;
  LlCallMask mask;
  // Buffer closed: a replay after close does nothing.
  if (!ll_begin_call(s.state, st0, s.rank, &seq, &mask)) return;
  if (tid == 0) ll_probe_at(s.state, 8);  // the state read returned (last block)
  long long tseg = ll_probe_clock();  // segment probes (cycles, per warp)
  const int half = seq & 1, prev = half ^ 1;
  int32_t* slot_ctr = s.slot_ctr + (seq & 1) * E;  // this call's row
  if (a.phases & kLlPhaseSend) ll_mark_start(s.state, seq);
  ll_reset_next_slots(s, seq);
  const int64_t payload = kFp8 ? H + (H / kLlFp8Block) * 4 : 2 * H;
  const int64_t msg_bytes = kLlHeaderBytes + payload;

  // Warp 0 claims the slots of part `part` of token t: lane k holds slot k's
  // expert; duplicates and weight sums come from the warp's lanes (one load
  // of the row's indices, no re-reads). (e64, wk): the lane's slot of token t,
  // loaded by ids() ahead of the claim. Part 0 counts the token's dropped ids.
  // At T = 1 this and the count are the first phase's critical path, run by
  // one warp each: few instructions matter more than few round trips here.
  // Token t's staged copy in our buffer: the source of its port messages' puts.
  auto staged_at = [&](int t) {
    return s.local + L.half_base(half) + L.send_off + int64_t(t) * L.dispatch_msg;
  };
  auto claim = [&](int part, int t, int64_t e64, float wk, bool from_ids) {
    // In int from here (an int64 division is a ~100-instruction call, an
    // int64 shuffle two): the id in [0, E), -1 "none", -2 out of range.
    const int e = lane < K ? ll_expert_id(e64, E) : kLlNoLane;
    // One message per (token, expert): only the first slot holding e sends.
    const unsigned same = __match_any_sync(0xffffffffu, e);
    const bool dup = (same & ll_lanemask_lt()) != 0;
    float w = 0.f;  // weighted: the expert's weight, all of its slots in slot order
    if (weighted) {
      for (int k2 = 0; k2 < K; ++k2) {
        const float ow = __shfl_sync(0xffffffffu, wk, k2);
        if ((same >> k2) & 1u) w = __fadd_rn(w, ow);
      }
    }
    // Direct slot: how many earlier tokens also go to e (each sends e at most
    // one message, and they are numbered in token order), so no atomic round
    // trip sits between the ids and the first store.
    int before = 0;
    if (from_ids) {
#pragma unroll
      for (int t2 = 0; t2 + 1 < kDirectSlotsMaxT; ++t2) {
        if (t2 >= t) break;  // uniform: t is the warp's token
        const int eb = lane < K ? ll_expert_id(e_before[t2], E) : kLlNoLane;
        bool hit = false;
        for (int k2 = 0; k2 < K; ++k2) hit |= __shfl_sync(0xffffffffu, eb, k2) == e;
        before += hit;
      }
    }
    char* ptr = nullptr;  // a direct message's destination
    bool port = false;    // a port message of this block
    if (lane < K) {
      int dst = -1, slot = -1;
      long long off = 0;
      const bool lead = part == 0, valid = e >= 0;
      const int ei = valid ? e : 0, owner = s.div_local_experts.div(ei);
      if (valid && !mask.reachable(owner)) {
        if (!weighted && lead) atomicAdd(&s.state->dropped, 1);  // a masked rank's expert: not sent
      } else if (valid) {
        const bool is_port = s.peer_kind[owner] == kLlPort;
        const bool mine = is_port ? lead : (lane & (G - 1)) == part;
        if (!dup && mine) {
          slot = from_ids ? before : atomicAdd(&slot_ctr[ei], 1);
          dst = owner;
          off = L.dispatch_slot(half, ei - owner * LE, s.rank, slot, R, M);
          if (weighted) s_wt[lane] = w;
          port = is_port;
          if (!is_port) ptr = s.peer_base[owner] + off;
        }
      } else if (e != -1 && !weighted && lead) {  // the forward dispatch already counted it
        atomicAdd(&s.state->dropped, 1);
      }
      s_dst[lane] = dst;
      s_exp[lane] = e;
      s_slot[lane] = slot;
      s_off[lane] = off;
    }
    const unsigned direct_lanes = __ballot_sync(0xffffffffu, ptr != nullptr);
    const bool any_port = __any_sync(0xffffffffu, port);
    if (ptr != nullptr) s_ptr[__popc(direct_lanes & ll_lanemask_lt())] = ptr;
    if (lane == 0) {
      const int nd = __popc(direct_lanes);
      if (any_port) s_ptr[nd] = staged_at(t);
      s_nptr = nd + any_port;
      s_any_port = any_port;
    }
  };

  // ---------------------------------------------------------------- count
  // Warps 1.. count every distinct in-range expert of each token once (as the
  // send loop sends) while warp 0 claims the first token's slots: the claims'
  // round trip to L2 and the row's load overlap the counting.
  if (send_experts > 0) {
    if (warp == 0) {
      if (blockIdx.x < units) claim(blockIdx.x & (G - 1), blockIdx.x >> gsh, e0, w0, direct);
      if (blockIdx.x < units) ll_probe_seg(s.state, 17, &tseg);  // state read -> slots claimed
    } else {
      const int n = blockDim.x - 32;
      for (int e = tid - 32; e < E; e += n) s_hist[e] = 0;
      asm volatile("bar.sync 1, %0;" ::"r"(n) : "memory");  // warps 1.. only
      // A pass: lane g h + k holds slot k of token count_token(pass) (h = ch);
      // the slot counts when it is the first of its token to hold its expert
      // (one match across the warp, keyed by expert and token). A batch's
      // passes are requested together (a pass per round trip would cost ~0.6
      // us each), and the shared adds follow them: the compiler keeps a load
      // after an atomic that precedes it.
      const unsigned lt = ll_lanemask_lt();
      for (int b = 0; count_token(b) - ch < T; b += kBatch) {  // uniform over the warp
        LlIdParts id[kBatch];
        if (b == 0) {
#pragma unroll
          for (int p = 0; p < kBatch; ++p) id[p] = first_ids[p];
        } else {
          load_batch(b, id);
        }
#pragma unroll
        for (int p = 0; p < kBatch; ++p) {
          if (count_token(b + p) - ch >= T) break;  // uniform
          const int e = ll_expert_id(id[p], E, a.idx64);
          const int key = e >= 0 ? (e << 2) | ch : -1 - lane;  // unique where not counted
          const bool first = (__match_any_sync(0xffffffffu, key) & lt) == 0;
          if (e >= 0 && first && mask.reaches_expert(e, LE)) atomicAdd(&s_hist[e], 1);
        }
      }
    }
  }
  __syncthreads();
  if (warp == 0 && blockIdx.x < units) ll_probe_seg(s.state, 18, &tseg);  // -> the block's count done
  ll_probe(s.state, 0);  // every block running, messages counted, first slots claimed

  // ---------------------------------------------------------------- send
  for (int u = blockIdx.x; u < units; u += gridDim.x) {
    const int t = u / G;
    if (u != blockIdx.x) {  // G == 1 here: more tokens than blocks
      prefetch(t);
      if (warp == 0) {
        int64_t e;
        float wk;
        ids(t, &e, &wk);
        claim(0, t, e, wk, false);  // T > grid here: never direct
      }
      __syncthreads();
    }
    const bool any_port = s_any_port;
    const int nptr = s_nptr;
    char* staged = staged_at(t);

    // Store 16 bytes at byte `at` of the message to every destination (and
    // the staged copy).
    auto store_all = [&](int64_t at, const uint4& v) {
#pragma unroll 1  // compact: one to a few pointers (code size is latency at small T)
      for (int i = 0; i < nptr; ++i) *reinterpret_cast<uint4*>(s_ptr[i] + at) = v;
    };
    const uint4 header = make_uint4(static_cast<unsigned>(t), 0u, 0u, 0u);
    if (!weighted) {
      if (tid == 0) store_all(0, header);
    } else {
      // Per destination header: token and that expert's weight (bytes 8..11).
      // Port peers share the staged copy, whose weight word stays 0: an add
      // pushed after the put fills it in (the proxy keeps push order).
      if (tid == 0 && any_port) *reinterpret_cast<uint4*>(staged) = header;
      if (tid < K && s_dst[tid] >= 0 && s.peer_kind[s_dst[tid]] != kLlPort)
        *reinterpret_cast<uint4*>(s.peer_base[s_dst[tid]] + s_off[tid]) =
            make_uint4(static_cast<unsigned>(t), 0u, __float_as_uint(s_wt[tid]), 0u);
    }
    if (kFp8) {
      // Chunk c = tid: 16 channels a thread, 8 threads (one warp's lanes) per
      // 128-channel scale block.
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
#pragma unroll 1
          for (int i = 0; i < nptr; ++i) *reinterpret_cast<float*>(s_ptr[i] + at) = sinv;
        }
      }
    } else {
      if (tid < nvec) store_all(kLlHeaderBytes + int64_t(tid) * 16, pre0);
      if (tid + kThreads < nvec) store_all(kLlHeaderBytes + int64_t(tid + kThreads) * 16, pre1);
    }
    if (warp == 0) ll_probe_at(s.state, 9);  // the message stores issued (warp 0)
    if (warp == 0 && u == blockIdx.x) ll_probe_seg(s.state, 19, &tseg);  // -> stores issued
    if (any_port) __threadfence_system();  // staged bytes visible to the proxy's copy
    __syncthreads();
    // Thread k signals message k. The __syncthreads ordered the block's stores
    // before this thread's release (cumulativity), so the receiver's acquire of
    // the word covers the whole message; for a port peer the proxy performs the
    // add after the put pushed before it by this same thread.
    if (tid < K && s_dst[tid] >= 0) {
      const int p = s_dst[tid], slot = s_slot[tid], e = s_exp[tid], j = e - p * LE;
      if (slot == 0) ll_clean_prev(s, prev, j, p);  // the first signal to p for (j, us)
      ll_probe_at(s.state, 4);  // a message's signal begins
      if (s.peer_kind[p] == kLlPort) {
        ll_port_put(s.handles, p, s_off[tid], staged - s.local, msg_bytes);
        if (weighted)
          ll_port_add(s.handles, p, s_off[tid] + 8,
                      static_cast<int64_t>(__float_as_uint(s_wt[tid])));
      }
      ll_signal_add(s, p, L.dispatch_counter(half, j, s.rank, R), ll_count_delta(slot, s_hist[e]),
                    slot == 0);
      ll_probe_at(s.state, 5);  // ... and returned (the release fence waited for the bytes)
    }
    __syncthreads();
  }

  ll_probe(s.state, 1);  // tokens sent
  // An expert none of our tokens goes to still needs its count ("none"): said
  // by the blocks without a send unit when there are any (at once: they have
  // nothing to send first), else by block e % grid after its sends.
  const LlIdleBlocks none_by = ll_idle_blocks(units);
  for (int e = none_by.first(tid); none_by.mine && e < send_experts; e += none_by.stride()) {
    if (s_hist[e] != 0) continue;
    const int p = s.div_local_experts.div(e), j = e - p * LE;
    // Cleared for a masked peer too, so its words are clean if it is unmasked.
    ll_clean_prev(s, prev, j, p);
    if (!mask.reachable(p)) continue;
    ll_signal_add(s, p, L.dispatch_counter(half, j, s.rank, R), kLlEmptyCount, true);
  }

  if ((a.phases & kLlPhaseSend) && blockIdx.x == gridDim.x - 1 && warp == nwarps - 1) {
    ll_exchange_mask_reports(s, mask);
    if (lane == 0) ll_fold_timing(s.state, seq);
  }

  __syncthreads();
  if (a.phases & kLlPhaseSend) ll_mark_send_end(s.state, seq);
  ll_probe(s.state, 2);  // counts published

  const bool discard = kLlDiscardDispatch && a.discard;  // slots dropped from the L2 once copied
  // Part `part` of 1 << ssh of the message at src, to output row out_row (and
  // its token id to src_info, its scales with the last part).
  auto copy_row = [&](const char* src, int64_t out_row, int part, int ssh, long long* trs) {
    const int tok = __ldcg(reinterpret_cast<const int*>(src));
    const uint4* body = reinterpret_cast<const uint4*>(src + kLlHeaderBytes);
    const int nv = kFp8 ? H / 16 : H / 8, per = (nv + (1 << ssh) - 1) >> ssh;
    const int c0 = part * per, n = min(per, nv - c0);
    // src_info is stored once the row's loads are in flight (ll_warp_copy_late):
    // a store before them would hold them back until tok arrived.
    // (Part 0 always has vectors: n > 0 there.)
    auto dst_at = [&](uint4* d) {
      return [&, d]() {
        ll_probe_after(s.state, 11, tok);  // the row's token id arrived (its loads in flight)
        ll_probe_seg_after(s.state, 14, trs, tok);  // -> token id in
        if (lane == 0 && part == 0) a.src_info[out_row] = tok;
        return d + c0;
      };
    };
    if (kFp8) {
      uint4* d = reinterpret_cast<uint4*>(static_cast<char*>(a.recv_x) + out_row * H);
      // The scales (H / 128 <= 64: two a lane) load with the row, not after it.
      const bool last = part == (1 << ssh) - 1;
      const float* sc = reinterpret_cast<const float*>(src + kLlHeaderBytes + H);
      const int ns = H / kLlFp8Block;
      float s0 = 0.f, s1 = 0.f;
      if (last && lane < ns) s0 = __ldcg(sc + lane);
      if (last && lane + 32 < ns) s1 = __ldcg(sc + lane + 32);
      if (n > 0) ll_warp_copy_late<true>(body + c0, n, lane, dst_at(d), discard);
      if (last && lane < ns) a.recv_scales[out_row * ns + lane] = s0;
      if (last && lane + 32 < ns) a.recv_scales[out_row * ns + lane + 32] = s1;
      ll_probe_at(s.state, 7);  // a row's part copied (its stores issued)
      ll_probe_seg(s.state, 15, trs);  // -> row stores issued
    } else {
      uint4* d = reinterpret_cast<uint4*>(static_cast<char*>(a.recv_x) + out_row * H * 2);
      if (n > 0) ll_warp_copy_late<true>(body + c0, n, lane, dst_at(d), discard);
      ll_probe_at(s.state, 7);
    }
  };

  // ---------------------------------------------------------------- receive
  // Every local expert at once: a block takes experts blockIdx.x + g * grid, a
  // group of nwarps / groups warps each (one pass while LE <= 16 * grid, e.g.
  // 2112 on an H200; beyond that one warp per expert, in passes). Every warp of a
  // group reads the R counts itself and scans them with shuffles, so no block
  // barrier sits between a count and its rows.
  const int groups = recv_experts > 0 ? (recv_experts + gridDim.x - 1) / gridDim.x : 0;
  // Warps per expert: nwarps / groups rounded down to a power of two.
  const int wsh = groups > 0 ? max(ll_log2_floor(nwarps) - ll_log2_ceil(groups), 0) : 0;
  const int wpe = 1 << wsh;
  const int epp = nwarps >> wsh, gw = warp & (wpe - 1);  // experts a block takes per pass
  for (int g = warp >> wsh; g < groups && (warp >> wsh) < epp; g += epp) {
    const int j = blockIdx.x + g * gridDim.x;
    if (j >= recv_experts) break;
    // Loaded before the wait, so its round trip overlaps it (its store follows the count).
    const int32_t stats = gw == 0 && lane == 0 && !weighted ? a.stats_in[j] : 0;
    long long trs = ll_probe_clock();
    // Counts of source ranks lane and lane + 32, inclusive prefix. Only the
    // lanes and scan steps R needs (at R = 1 no shuffle); a lane past R holds
    // INT_MAX, so the source-rank ballots below never count it.
    int cnt[2], incl[2];
    const int nh = R > 32 ? 2 : 1;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = lane + 32 * h;
      cnt[h] = 0;
      if (h < nh && r < R && mask.reachable(r)) {
        const int64_t v = ll_wait_peer(s, s.local + L.dispatch_counter(half, j, r, R),
                                       [](int64_t w) { return ll_count_complete(w); }, r,
                                       kPhaseDispatchRecv);
        const int c = v != 0 ? ll_count_of(v) : 0;
        cnt[h] = c < 0 ? 0 : (c > M ? M : c);
        if (cnt[h] > 0) ll_probe_at(s.state, 6);  // a count with rows seen
      }
    }
    __syncwarp();  // the lanes that waited rejoin before the shuffles
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      incl[h] = cnt[h];
      if (h >= nh) continue;  // uniform
      const int width = h == 0 ? min(R, 32) : R - 32;  // lanes of this half holding ranks
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        if (d >= width) break;  // uniform
        const int o = __shfl_up_sync(0xffffffffu, incl[h], d);
        if (lane >= d) incl[h] += o;
      }
    }
    // Lane width - 1 of each half holds its sum (lanes past it only add zeros).
    if (nh == 2) incl[1] += __shfl_sync(0xffffffffu, incl[0], 31);
    const int total = __shfl_sync(0xffffffffu, nh == 2 ? incl[1] : incl[0], nh == 2 ? R - 33 : R - 1);
    if (lane >= R) incl[0] = INT_MAX;
    if (lane + 32 >= R) incl[1] = INT_MAX;
    if (total > 0) ll_probe_seg(s.state, 16, &trs);  // receive start -> counts seen, scanned
    if (gw == 0 && !weighted) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = lane + 32 * h;
        if (r < R)
          a.layout_range[int64_t(j) * R + r] =
              (static_cast<int64_t>(incl[h] - cnt[h]) << 32) | static_cast<uint32_t>(cnt[h]);
      }
      if (lane == 0) {
        a.recv_count[j] = total;
        a.stats_out[j] = stats + total;
      }
    }
    if (total > 0) ll_probe_at(s.state, 10);  // counts laid out, handle stored
    if (total > 0) ll_probe_seg(s.state, 13, &trs);  // -> counts laid out
    if (weighted) {  // rows past the block hold no (token, expert): gradient 0
      for (int row = total + gw; row < R * M; row += wpe) {
        uint4* d = reinterpret_cast<uint4*>(static_cast<char*>(a.recv_x) +
                                            (int64_t(j) * R * M + row) * H * 2);
        for (int c = lane; c < H / 8; c += 32) d[c] = make_uint4(0u, 0u, 0u, 0u);
      }
    }
    // Few rows (small T): each row split over several of the group's warps, so
    // a copy is one round of loads per lane instead of several. split is
    // wpe / total rounded down to a power of two: shifts below, not divisions.
    const int ssh = !weighted && total > 0 && total < wpe ? wsh - ll_log2_ceil(total) : 0;
    const int split = 1 << ssh;
    for (int wi = gw; wi < total << ssh; wi += wpe) {
      const int row = wi >> ssh, part = wi & (split - 1);
      // Source rank of the row: how many ranks' blocks end at or before it.
      const int r = __popc(__ballot_sync(0xffffffffu, incl[0] <= row)) +
                    __popc(__ballot_sync(0xffffffffu, incl[1] <= row));
      const int base = __shfl_sync(0xffffffffu, r < 32 ? incl[0] - cnt[0] : incl[1] - cnt[1], r & 31);
      const char* src = s.local + L.dispatch_slot(half, j, r, row - base, R, M);
      if (!weighted) {
        copy_row(src, int64_t(j) * R * M + row, part, ssh, &trs);
        continue;
      }
      // Weighted (combine's backward): the row scaled by its header's weight.
      const int tok = __ldcg(reinterpret_cast<const int*>(src));
      const uint4* body = reinterpret_cast<const uint4*>(src + kLlHeaderBytes);
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
    }
  }

  ll_probe(s.state, 3);  // rows received
  if (blockIdx.x == 0 && tid == 0) *a.order_out = order;
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
  cudaError_t e = cudaFuncGetAttributes(&attr, ll_dispatch_kernel<true, false>);
  if (e == cudaSuccess) e = cudaFuncGetAttributes(&attr, ll_dispatch_kernel<false, false>);
  if (e == cudaSuccess) e = cudaFuncGetAttributes(&attr, ll_dispatch_kernel<false, true>);
  return e;
}

// Weighted mode is bf16 only (LlDispatchArgs).
void ll_launch_dispatch(const LlDispatchArgs& a, int num_blocks, cudaStream_t stream) {
  if (a.slot_weights != nullptr)
    ll_dispatch_kernel<false, true><<<num_blocks, kThreads, 0, stream>>>(a);
  else if (a.use_fp8)
    ll_dispatch_kernel<true, false><<<num_blocks, kThreads, 0, stream>>>(a);
  else
    ll_dispatch_kernel<false, false><<<num_blocks, kThreads, 0, stream>>>(a);
}

void ll_launch_peers_init(ChannelDeviceHandle* handles, char* local, LlPeer* peers, int nranks,
                          cudaStream_t stream) {
  ll_peers_init_kernel<<<(nranks + 63) / 64, 64, 0, stream>>>(handles, local, peers, nranks);
}

}  // namespace jmep
