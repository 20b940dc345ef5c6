// Arguments of the LL kernels: persistent state (from the registry) plus the
// per-call XLA buffers. Passed by value; nothing in here changes per call on
// the host, so a captured CUDA graph replays correctly.
#pragma once
#include <cuda_runtime_api.h>

#include <climits>
#include <cstddef>
#include <cstdint>

#include "kernels/ll_discard.cuh"
#include "kernels/ll_divisor.h"
#include "kernels/ll_grid.h"
#include "kernels/ll_layout.cuh"
#include "kernels/ll_peer.cuh"

namespace jmep {

// Probes 0..3 are phase probes (ll_probe: the last block past a barrier), 4..11
// event probes (ll_probe_at: the last warp at a point, no barrier), 12 the
// call's start mark (t_start). In probe builds every probe counts from block
// 0's first instruction (ll_probe_entry), which is ahead of t_start by the
// state read. 13..19 are segments (ll_probe_seg): SM cycles one warp spent
// between two of its own points, the most any warp spent.
constexpr int kLlProbes = 20;
constexpr int kLlProbeStart = 12, kLlProbeSeg0 = 13;

// One call's %globaltimer marks: start (block 0), end of the send phase and of
// the call (max over blocks). Two records, by seq parity: a call writes its
// own and folds the previous call's into the sums (ll_fold_timing), so no
// block has to learn that it is the last one; the host folds the newest.
struct LlTimingRecord {
  uint64_t t_start;
  unsigned long long t_send_end;
  unsigned long long t_end;
  int32_t kind;  // 0: nothing to fold; 1 + (0 dispatch, 1 combine): a finished call
  int32_t pad;
};

// Per-buffer device state (the host never touches seq: kernels advance it).
struct LlDeviceState {
  int32_t unused;
  int32_t closed;       // set by Buffer.close(); then 1 + calls replayed after it
  // Bit p: peer p is masked (issue 17): no kernel sends to it or waits on it.
  // Read with closed in one 16-byte load; set by the host
  // (Buffer.mask_ranks) between calls, or by a kernel whose wait on p timed
  // out under on_peer_failure="mask" (then in force from the next call; waits
  // on p later in the same call see it and end at once).
  unsigned long long masked;
  int32_t blocks_done;  // probe builds only: the last block folds the probes
  int32_t dropped;      // expert ids outside [-1, E) seen by dispatch (never sent)
  // Kernel timing from %globaltimer (what the benchmark reports as kernel time):
  // [0] dispatch, [1] combine. send = first block's start to the last block's
  // end of the send (+ publish) phase; total = to the last block's end.
  uint64_t sum_send_ns[2];
  uint64_t sum_total_ns[2];
  uint64_t calls[2];
  LlTimingRecord rec[2];
  // Phase probes (builds with -DJMEP_LL_PROBES, for finding where a call's time
  // goes): latest time any block passed probe i, and its sum over calls.
  unsigned long long probe_max[kLlProbes];
  uint64_t sum_probe_ns[2][kLlProbes];
  uint64_t probe_entry;  // block 0's first instruction in the current call
  // Per masked peer: who masked it (this rank, or -1: the host) and in which phase.
  int32_t mask_by[kLlMaxRanks];
  int32_t mask_phase[kLlMaxRanks];
  // seq[b]: the call block b runs next. Its low bit selects the call's half.
  // Every block of a call sets all the words it owns (b, b + grid, ...) to
  // seq + 1 at its end, so the next kernel's blocks all read the same value,
  // whatever its grid, and no block waits for the others to finish.
  int32_t seq[kLlMaxBlocks];
  // Followed in memory by int32 slot[2][E] (dispatch send, LlStatic::slot_ctr).
};

static_assert(offsetof(LlDeviceState, masked) == 8, "ll_begin_call reads closed, masked at once");

struct LlStatic {
  LlLayout layout;
  char* local;                  // this rank's registered buffer
  ChannelDeviceHandle* handles; // [R] channel layer handles (port ops)
  LlDeviceState* state;
  // [2][E] next free slot per destination expert; a dispatch with seq s claims in
  // row s & 1, and every LL kernel zeroes row (s + 1) & 1 for the next one
  // (ll_reset_next_slots), so no kernel waits for the claims to end before a reset.
  int32_t* slot_ctr;
  ErrorRecord* error;
  int64_t timeout_ns;
  int32_t rank, nranks, num_experts, local_experts, max_tokens, hidden;
  int32_t mask_on_failure;  // on_peer_failure="mask": a timed-out peer is masked, not fatal
  LlDivisor div_ranks, div_local_experts;  // by nranks, local_experts (ll_divisor.h)
  // The peer table (ll_peer.cuh) by value: kernel parameters are read through the
  // constant cache (__grid_constant__), so a kernel reaches its peers without a
  // global load and a barrier first. Filled at registration; never changes.
  // Kinds first: every path reads them, next to the fields above.
  int8_t peer_kind[kLlMaxRanks];
  char* peer_base[kLlMaxRanks];
};

// A call runs both halves; the split API runs the send half (data out, counts
// or flags published) and, later in the stream, the receive half, which also
// flips the buffer's half. Nothing else may use the Buffer in between.
constexpr int32_t kLlPhaseSend = 1, kLlPhaseRecv = 2, kLlPhaseBoth = 3;

// In both argument structs the per-call fields come first and the static part
// (whose peer table is most of the bytes) last: a kernel's first instructions
// read these through the constant cache, and each 64-byte line they touch is a
// miss the first time in a launch, so the fields read at the start sit together.
struct LlDispatchArgs {
  const void* x;            // [T, H] bf16
  const void* topk_idx;     // [T, K] int32 or int64
  const int32_t* stats_in;  // [LE]
  const int32_t* order_in;
  void* recv_x;             // [LE, R*M, H] bf16 or e4m3
  float* recv_scales;       // [LE, R*M, H/128] (fp8 only)
  int32_t* recv_count;      // [LE]
  int32_t* src_info;        // [LE, R*M]
  int64_t* layout_range;    // [LE, R] (offset << 32) | count
  int32_t* stats_out;
  int32_t* order_out;
  int32_t num_tokens, topk;
  int32_t phases;  // kLlPhaseSend | kLlPhaseRecv: split halves run one each
  bool idx64, use_fp8, round_scale;
  bool discard;  // the receive drops its slots from the L2 once copied (ll_discard.cuh)
  // Weighted mode (combine's backward, bf16 only): each (token, expert) message
  // carries the sum of that expert's slot weights in its header, the receiver
  // scales the row by it and stores it at row_map's row, zeroes the rest of
  // the block, and writes no handle/count/stats outputs (those are null).
  const float* slot_weights;  // [T, K] f32, or null
  const int32_t* row_map;     // [LE, R*M]: row of (source rank r, token t) at [j, r*M + t]
  LlStatic s;
};

struct LlCombineArgs {
  const void* y;               // [LE, R*M, H] bf16
  const void* topk_idx;        // [T, K]
  const float* topk_weights;   // [T, K]
  const int32_t* src_info;     // [LE, R*M]
  const int64_t* layout_range; // [LE, R]
  const int32_t* order_in;
  void* out;                   // [T, H] bf16
  int32_t* order_out;
  int32_t num_tokens, topk;
  int32_t phases;  // kLlPhaseSend | kLlPhaseRecv
  bool idx64;
  // Per-slot mode (combine's backward w.r.t. topk_weights): out is [T, K, H],
  // slot k's row copied unreduced (zeros for masked slots); weights unused.
  bool per_slot;
  bool discard;  // the reduce drops its slots from the L2 once read (ll_discard.cuh)
  LlStatic s;
};

// One warp copies n 16-byte vectors in rounds of up to 8 a lane (a bf16 row
// of 7168 channels is 28 a lane, fp8 14), every load of a round issued before
// its first store: the copies here are latency-bound (a few rows per block),
// so a copy costs one memory latency per round. (A tail loop of load-store
// pairs costs one per vector: the compiler may not move a load above a store
// that might alias it.) dst() is asked for the destination once the first round's
// loads are in flight, so a load it needs (e.g. the row's token id) overlaps
// them; null means "store nothing". kCacheGlobal: the source was written by
// peers during this kernel (skip L1); else read-only. discard_src (warp-uniform):
// the source lines are dead once copied (ll_discard.cuh says when).
#ifndef JMEP_LL_COPY_ROUND
#define JMEP_LL_COPY_ROUND 8  // 16 and 12 were no faster on the H200 (and spill in dispatch)
#endif
constexpr int kLlCopyRound = JMEP_LL_COPY_ROUND;
template <bool kCacheGlobal, typename Dst>
__device__ __forceinline__ void ll_warp_copy_late(const uint4* src, int n, int lane, Dst dst,
                                                  bool discard_src = false) {
  uint4* d = nullptr;
  for (int b = 0; b < n; b += 32 * kLlCopyRound) {
    uint4 v[kLlCopyRound];
#pragma unroll
    for (int u = 0; u < kLlCopyRound; ++u) {
      const int c = b + lane + 32 * u;
      if (c < n) v[u] = kCacheGlobal ? __ldcg(src + c) : __ldg(src + c);
    }
    if (b == 0) d = dst();
    if (d == nullptr) return;
#pragma unroll
    for (int u = 0; u < kLlCopyRound; ++u) {
      const int c = b + lane + 32 * u;
      if (c < n) d[c] = v[u];
    }
  }
  // After the last round, not each: the stores used every load (they have returned).
  if (discard_src && d != nullptr) ll_warp_discard(src, src + n, lane);
}

template <bool kCacheGlobal>
__device__ __forceinline__ void ll_warp_copy(uint4* dst, const uint4* src, int n, int lane) {
  ll_warp_copy_late<kCacheGlobal>(src, n, lane, [dst]() { return dst; });
}

// Work that any block may do, spread over the blocks without one of the
// call's `units` (they have nothing else to do first) when there are any, else
// over every block, after its units. Thread tid of such a block starts at
// first(tid) and steps by stride(): the items are covered once, none twice.
struct LlIdleBlocks {
  int idle0, nidle;
  bool mine;
  __device__ __forceinline__ int first(int tid) const {
    return static_cast<int>(blockIdx.x) - idle0 + tid * nidle;
  }
  __device__ __forceinline__ int stride() const { return nidle * static_cast<int>(blockDim.x); }
};
__device__ __forceinline__ LlIdleBlocks ll_idle_blocks(int units) {
  const int idle0 = units < static_cast<int>(gridDim.x) ? units : 0;
  return {idle0, static_cast<int>(gridDim.x) - idle0, static_cast<int>(blockIdx.x) >= idle0};
}

// Bit p of a rank mask.
__device__ __forceinline__ bool ll_is_masked(unsigned long long mask, int p) {
  return (mask >> p) & 1ull;
}

// The masked ranks a call goes by (LlDeviceState::masked at its start). A
// masked rank (the group masked us, or the user) exchanges nothing; nobody
// exchanges with a masked peer.
struct LlCallMask {
  unsigned long long bits;
  bool self_masked;
  __device__ __forceinline__ bool reachable(int p) const {
    return !self_masked && !ll_is_masked(bits, p);
  }
  // reachable(owner of expert e): no division while nobody is masked.
  __device__ __forceinline__ bool reaches_expert(int e, int local_experts) const {
    return bits == 0 ? !self_masked : reachable(e / local_experts);
  }
};

// Every LL kernel's first read: the call's seq, or false when the Buffer was
// closed. Executables compiled before Buffer.close() keep this state alive
// (ll_entry.cuh), and XLA may replay their kernels from a CUDA graph without
// asking the FFI handler; such a kernel must touch nothing else (the peers'
// and the channel layer's memory may be gone), so it counts itself and returns.
// Every block returns before its first __syncthreads, none waits on another.
// Two steps: ll_read_state issues the loads (a kernel's first instruction, so
// their round trip overlaps the loads of XLA's buffers, which stay valid after
// close), ll_begin_call uses them. The two loads are independent: one round trip.
struct LlStateRead {
  unsigned long long v, m;  // (unused, closed), masked
  int32_t seq;
};
__device__ __forceinline__ LlStateRead ll_read_state(LlDeviceState* st) {
  LlStateRead r;
  asm volatile("ld.volatile.global.v2.u64 {%0, %1}, [%2];" : "=l"(r.v), "=l"(r.m) : "l"(st) : "memory");
  r.seq = *reinterpret_cast<const volatile int32_t*>(&st->seq[blockIdx.x]);
  return r;
}
// *mask: the masked ranks this call goes by, for this rank.
__device__ __forceinline__ bool ll_begin_call(LlDeviceState* st, const LlStateRead& r, int rank,
                                              int32_t* seq, LlCallMask* mask) {
  *seq = r.seq;
  *mask = LlCallMask{r.m, ll_is_masked(r.m, rank)};
  if ((r.v >> 32) == 0) return true;  // little-endian: unused, then closed
  if (blockIdx.x == 0 && threadIdx.x == 0) atomicAdd(&st->closed, 1);
  return false;
}

__device__ __forceinline__ int64_t ll_load_idx(const void* p, int64_t i, bool idx64) {
  return idx64 ? static_cast<const int64_t*>(p)[i] : static_cast<const int32_t*>(p)[i];
}

// An expert id narrowed to int: the id in [0, E), -1 ("no expert"), or -2
// (out of range: dropped). Narrowed once, so the kernels' compares, shuffles
// and divisions on it are 32-bit (an int64 division is a software call).
__device__ __forceinline__ int ll_expert_id(int64_t v, int E) {
  return v >= 0 && v < E ? static_cast<int>(v) : v == -1 ? -1 : -2;
}
constexpr int kLlNoLane = INT_MIN;  // a lane past K: equal to no id

// An id as loaded (int32 ids: lo; int64: both words), narrowed only when used:
// widening an int32 id as it lands would make a batch of loads wait on one
// another.
struct LlIdParts {
  int lo, hi;
};
__device__ __forceinline__ void ll_load_id_parts(const void* p, int64_t i, bool idx64, bool on,
                                                 LlIdParts* out) {
  out->lo = -1;
  out->hi = -1;
  if (!on) return;
  if (idx64) {
    const int2 v = static_cast<const int2*>(p)[i];  // little-endian: low word first
    out->lo = v.x;
    out->hi = v.y;
  } else {
    out->lo = static_cast<const int32_t*>(p)[i];
  }
}
__device__ __forceinline__ int ll_expert_id(const LlIdParts& id, int E, bool idx64) {
  const int hi = idx64 ? id.hi : id.lo >> 31;  // int32: the sign
  if (hi == 0 && static_cast<unsigned>(id.lo) < static_cast<unsigned>(E)) return id.lo;
  return hi == -1 && id.lo == -1 ? -1 : -2;
}

__device__ __forceinline__ unsigned ll_lanemask_lt() {
  unsigned m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
}

__device__ __forceinline__ void ll_mark_start(LlDeviceState* st, int32_t seq) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    const uint64_t t = globaltimer_ns();
    st->rec[seq & 1].t_start = t;
#if defined(JMEP_LL_PROBES)
    st->probe_max[kLlProbeStart] = t;
#endif
  }
}

// Called by every block once its send phase is over (after a __syncthreads).
__device__ __forceinline__ void ll_mark_send_end(LlDeviceState* st, int32_t seq) {
  if (threadIdx.x == 0)
    atomicMax(&st->rec[seq & 1].t_send_end, static_cast<unsigned long long>(globaltimer_ns()));
}

// One finished call's record (of kind k: 0 dispatch, 1 combine) into the sums: the
// device's fold and the host's.
__host__ __device__ inline void ll_add_timing(LlDeviceState& st, const LlTimingRecord& r, int k) {
  st.sum_send_ns[k] += r.t_send_end > r.t_start ? r.t_send_end - r.t_start : 0;
  st.sum_total_ns[k] += r.t_end > r.t_start ? r.t_end - r.t_start : 0;
  st.calls[k] += 1;
}

// One thread of a call's send phase, off its critical path (its loads cost
// that thread a round trip): the previous call's record into the sums, then
// cleared for the next call. That record was finished by the previous kernel
// on the stream, and nobody else touches it during this call.
__device__ __forceinline__ void ll_fold_timing(LlDeviceState* st, int32_t seq) {
  LlTimingRecord& r = st->rec[(seq + 1) & 1];
  const int k = r.kind - 1;
  if (k < 0) return;
  ll_add_timing(*st, r, k);
  r.t_send_end = 0;
  r.t_end = 0;
  r.kind = 0;
}

// Probe i: every block records when it got here (after a __syncthreads).
__device__ __forceinline__ void ll_probe(LlDeviceState* st, int i) {
#if defined(JMEP_LL_PROBES)
  __syncthreads();
  if (threadIdx.x == 0) atomicMax(&st->probe_max[i], static_cast<unsigned long long>(globaltimer_ns()));
#else
  (void)st, (void)i;
#endif
}

// Event probe i: lane 0 of the calling warp records when it got here (no
// barrier, so a warp's own critical path is measured without being changed;
// one atomic per warp, so the probe's own traffic stays small).
__device__ __forceinline__ void ll_probe_at(LlDeviceState* st, int i) {
#if defined(JMEP_LL_PROBES)
  if ((threadIdx.x & 31) == 0)
    atomicMax(&st->probe_max[i], static_cast<unsigned long long>(globaltimer_ns()));
#else
  (void)st, (void)i;
#endif
}

// Event probe i once `dep` (a loaded value) has arrived: the branch on it
// keeps the timer read behind the load.
__device__ __forceinline__ void ll_probe_after(LlDeviceState* st, int i, int dep) {
#if defined(JMEP_LL_PROBES)
  if (dep != 0x7fffffff) ll_probe_at(st, i);
#else
  (void)st, (void)i, (void)dep;
#endif
}

// Segment probe i: lane 0 records the cycles since *t (its own clock), and
// *t moves here. Per warp, so the SMs' unsynchronised clocks do not matter.
__device__ __forceinline__ void ll_probe_seg(LlDeviceState* st, int i, long long* t) {
#if defined(JMEP_LL_PROBES)
  const long long now = clock64();
  if ((threadIdx.x & 31) == 0)
    atomicMax(&st->probe_max[i], static_cast<unsigned long long>(now - *t));
  *t = now;
#else
  (void)st, (void)i, (void)t;
#endif
}
// ll_probe_seg once `dep` (a loaded value) has arrived (see ll_probe_after).
__device__ __forceinline__ void ll_probe_seg_after(LlDeviceState* st, int i, long long* t, int dep) {
#if defined(JMEP_LL_PROBES)
  if (dep != 0x7fffffff) ll_probe_seg(st, i, t);
#else
  (void)st, (void)i, (void)t, (void)dep;
#endif
}
__device__ __forceinline__ long long ll_probe_clock() {
#if defined(JMEP_LL_PROBES)
  return clock64();
#else
  return 0;
#endif
}

// Probe builds: block 0 marks its first instruction, the probes' zero.
__device__ __forceinline__ void ll_probe_entry(LlDeviceState* st) {
#if defined(JMEP_LL_PROBES)
  if (blockIdx.x == 0 && threadIdx.x == 0) st->probe_entry = globaltimer_ns();
#else
  (void)st;
#endif
}

// Block-wide epilogue: this block's seq words move to the next call (flipping
// the half), and its end time goes into the call's record (`kind`: 0 dispatch,
// 1 combine). No fence and no returning atomic: the next kernel on the stream
// (the only reader of seq and of the record's kind) starts after this one
// ends, and each block read its own seq word at its start, so no block reads a
// word another block writes here. (A "last block" count would put an atomic
// round trip, and the last block's bookkeeping, on every call's tail.)
__device__ __forceinline__ void ll_finish_call(LlDeviceState* st, int32_t seq, int kind) {
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w = blockIdx.x; w < kLlMaxBlocks; w += gridDim.x) st->seq[w] = seq + 1;
  LlTimingRecord& r = st->rec[seq & 1];
  atomicMax(&r.t_end, static_cast<unsigned long long>(globaltimer_ns()));
  if (blockIdx.x == 0) r.kind = kind + 1;
#if defined(JMEP_LL_PROBES)
  // Probe builds: the last block folds the probes (its round trip is theirs).
  if (atomicAdd(&st->blocks_done, 1) == static_cast<int>(gridDim.x) - 1) {
    const uint64_t t0 = *reinterpret_cast<volatile uint64_t*>(&st->probe_entry);
    for (int i = 0; i < kLlProbes; ++i) {
      const uint64_t tp = atomicAdd(&st->probe_max[i], 0ull);
      st->sum_probe_ns[kind][i] += i >= kLlProbeSeg0 ? tp : tp > t0 ? tp - t0 : 0;
      st->probe_max[i] = 0;
    }
    st->blocks_done = 0;
  }
#endif
}

// Zero the slot counters the next dispatch claims in (see LlStatic::slot_ctr).
// No kernel of this call uses that row: the previous one's claims ended with it.
__device__ __forceinline__ void ll_reset_next_slots(const LlStatic& s, int32_t seq) {
  int32_t* next = s.slot_ctr + ((seq + 1) & 1) * s.num_experts;
  for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < s.num_experts; e += gridDim.x * blockDim.x)
    next[e] = 0;
}

// A dispatch count word (int64 per (local expert, source rank)) is written only by
// atomic adds, one per message, each released after that message's bytes: the
// message that claimed slot 0 adds (total + 1) << 32 as well, and a source with no
// message for the expert adds 1 << 32 alone. The word is complete when its high
// half A is set and its low half counts A - 1 messages; then every message is
// visible to the acquire that read it. 0 means "nothing yet".
__device__ __forceinline__ int64_t ll_count_delta(int slot, int total) {
  return 1 + (slot == 0 ? (static_cast<int64_t>(total) + 1) << 32 : 0);
}
constexpr int64_t kLlEmptyCount = int64_t(1) << 32;
__device__ __forceinline__ bool ll_count_complete(int64_t w) {
  const int64_t hi = w >> 32;
  return hi > 0 && (w & 0xffffffffLL) == hi - 1;
}
__device__ __forceinline__ int ll_count_of(int64_t w) { return static_cast<int>((w >> 32) - 1); }

// An add on peer p's signal word at `at` (a dispatch count, a combine flag): a
// system-scope release for a direct peer; for a port peer a fence when asked
// (our clears and staged bytes before the trigger) and an add the proxy
// performs after the puts pushed before it on that channel.
__device__ __forceinline__ void ll_signal_add(const LlStatic& s, int p, int64_t at, int64_t delta,
                                              bool fence_port) {
  if (s.peer_kind[p] == kLlPort) {
    if (fence_port) __threadfence_system();
    ll_port_add(s.handles, p, at, delta);
  } else {
    ll_direct_add(s.peer_base[p], at, delta);
  }
}

// Clear the previous call's signal words for pair (local expert j, peer p):
// our counter written by p for j, and our flag for p's expert j. Done by the
// thread that then signals p, so p cannot write them again before it sees
// that signal (see ll_dispatch.cu for the argument).
__device__ __forceinline__ void ll_clean_prev(const LlStatic& s, int prev_half, int j, int p) {
  const LlLayout& l = s.layout;
  *reinterpret_cast<volatile int64_t*>(s.local + l.dispatch_counter(prev_half, j, p, s.nranks)) = 0;
  *reinterpret_cast<volatile int64_t*>(
      s.local + l.combine_flag(prev_half, p * s.local_experts + j, s.num_experts)) = 0;
}

// Launchers (ll_dispatch.cu / ll_combine.cu). Grid = num_blocks, all co-resident.
void ll_launch_dispatch(const LlDispatchArgs& a, int num_blocks, cudaStream_t stream);
void ll_launch_combine(const LlCombineArgs& a, int num_blocks, cudaStream_t stream);
// Force-load the kernels on the current device (CUDA lazy loading).
cudaError_t ll_preload_dispatch();
cudaError_t ll_preload_combine();
void ll_launch_peers_init(ChannelDeviceHandle* handles, char* local, LlPeer* peers, int nranks,
                          cudaStream_t stream);

}  // namespace jmep
