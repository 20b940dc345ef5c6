// What every LL FFI handler does around its own shape checks: find the Buffer's
// entry by (buffer_id, device ordinal), refuse a closed or failed Buffer or a
// config mismatch, start the kernel arguments from the entry's static state,
// let the handler fill in its buffers, launch on XLA's stream, report launch
// errors. No host sync, no allocation, no per-call host state: command-buffer
// compatible.
#pragma once
#include <cuda_runtime_api.h>

#include <string>

#include "handlers/ll_attrs.h"
#include "handlers/ll_entry.cuh"
#include "handlers/ll_registry.h"
#include "handlers/ll_targets.h"
#include "kernels/ll_limits.h"
#include "xla/ffi/api/ffi.h"

namespace jmep {
namespace ffi = xla::ffi;

// Every execute stage binds XLA's stream and device first, then its buffers,
// then .Attrs<LlAttrs>() (the handler's parameters in that order).
inline auto ll_bind() {
  return ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>().Ctx<ffi::DeviceOrdinal>();
}

inline ffi::Error ll_require_buffer(const LlAttrs& at) {
  if (at.buffer_id < 0)
    return ffi::Error::InvalidArgument("a jax_mscclpp_ep.Buffer is required on GPU");
  return ffi::Error::Success();
}

// The entry a call runs on, or the error that names why there is none.
inline ffi::Error ll_entry_for(const LlAttrs& at, int32_t device, std::shared_ptr<LlEntry>* out) {
  if (auto err = ll_require_buffer(at); err.failure()) return err;
  *out = ll_find(at.buffer_id, device);
  if (*out == nullptr)
    return ffi::Error::InvalidArgument(ll_missing_message(
        at.buffer_id, " on device " + std::to_string(device) + ": was the Buffer created on this device?"));
  LlEntry& e = **out;
  // An earlier call that timed out left the state undefined: refuse, naming it.
  // (Inside a replayed CUDA graph this host check does not run; Buffer.check() does.)
  if (std::string f = ll_failure(e); !f.empty()) return ffi::Error::Internal(f);
  if (at.num_experts != e.st.num_experts || at.max_tokens != e.st.max_tokens)
    return ffi::Error::InvalidArgument("dispatch/combine shape does not match the Buffer's config");
  return ffi::Error::Success();
}

inline ffi::Error check_phases(const LlAttrs& at, const char* what) {
  if (at.phases != kLlPhaseBoth && at.phases != kLlPhaseRecv)
    return ffi::Error::InvalidArgument(std::string(what) +
                                       ": phases must be 3 (whole call) or 2 (receive half)");
  return ffi::Error::Success();
}

inline ffi::Error check_topk(ffi::AnyBuffer idx, int64_t tokens, int32_t* k, bool* idx64) {
  auto d = idx.dimensions();
  if (d.size() != 2 || d[0] != tokens || d[1] < 1 || d[1] > kLlMaxTopk)
    return ffi::Error::InvalidArgument("topk_idx must be [T, K] with 1 <= K <= " +
                                       std::to_string(kLlMaxTopk));
  if (idx.element_type() != ffi::DataType::S32 && idx.element_type() != ffi::DataType::S64)
    return ffi::Error::InvalidArgument("topk_idx must be int32 or int64");
  *k = static_cast<int32_t>(d[1]);
  *idx64 = idx.element_type() == ffi::DataType::S64;
  return ffi::Error::Success();
}

// y (combine's input): bf16 [LE, R*M, H] of this Buffer.
inline ffi::Error check_expert_rows(const LlStatic& s, ffi::AnyBuffer y) {
  auto d = y.dimensions();
  if (y.element_type() != ffi::DataType::BF16 || d.size() != 3 || d[0] != s.local_experts ||
      d[1] != int64_t(s.nranks) * s.max_tokens || d[2] != s.hidden)
    return ffi::Error::InvalidArgument("y must be bf16 [LE, R*M, H]");
  return ffi::Error::Success();
}

// x (dispatch's input): bf16 [T, H] with T <= M.
inline ffi::Error check_tokens(const LlStatic& s, ffi::AnyBuffer x, const char* name) {
  auto d = x.dimensions();
  if (x.element_type() != ffi::DataType::BF16 || d.size() != 2 || d[1] != s.hidden ||
      d[0] > s.max_tokens)
    return ffi::Error::InvalidArgument(std::string(name) +
                                       " must be bf16 [T, H] with T <= M and H = the Buffer's hidden");
  return ffi::Error::Success();
}

// The forward handle's layout_range: [LE, R] int64 (either dtype, same bytes).
inline ffi::Error check_layout_range(const LlStatic& s, ffi::AnyBuffer layout_range) {
  if (layout_range.size_bytes() != size_t(s.local_experts) * s.nranks * 8)
    return ffi::Error::InvalidArgument("layout_range must hold [LE, R] int64");
  return ffi::Error::Success();
}

inline void ll_launch(const LlDispatchArgs& a, int blocks, cudaStream_t st) {
  ll_launch_dispatch(a, blocks, st);
}
inline void ll_launch(const LlCombineArgs& a, int blocks, cudaStream_t st) {
  ll_launch_combine(a, blocks, st);
}

// Whether a call's receive drops its consumed slots from the L2 (ll_discard.cuh),
// from static shapes; decided here, so the kernel reads one flag beside its
// other per-call fields. Both kernels of a step decide alike, on the step's
// bf16 rows (T x K rows of 2H bytes: combine's payload, dispatch's in bf16):
// dispatch's discards pay off in the combine after it, so gating an fp8
// dispatch on its own smaller payload left them off where they help (H200,
// T = 128: combine after fp8 15.3 us with its own discards only, 14.5 with
// dispatch's too; ll_latency_discard_h200x1.md).
// (Combine's per-slot mode has no discarding instance: ll_launch_combine decides.)
template <typename Args>
inline bool ll_step_discards(const Args& a, int64_t min_bytes) {
  return int64_t(a.num_tokens) * a.topk * 2 * a.s.hidden >= min_bytes;
}

// The one body of every handler: `fill(args)` checks the handler's buffers and
// sets its fields of Args (a.s already holds the Buffer's static state).
template <typename Args, typename Fill>
ffi::Error ll_call(cudaStream_t stream, int32_t device, const LlAttrs& at, Fill&& fill) {
  std::shared_ptr<LlEntry> e;
  if (auto err = ll_entry_for(at, device, &e); err.failure()) return err;
  Args a{};
  a.s = e->st;
  if (auto err = fill(a); err.failure()) return err;
  a.discard = ll_step_discards(a, e->discard_bytes);
  // XLA normally has the stream's device current already; make sure of it,
  // since a launch on another device's stream fails.
  int cur = -1;
  if (cudaGetDevice(&cur) == cudaSuccess && cur != e->device) cudaSetDevice(e->device);
  ll_launch(a, e->num_blocks, stream);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return ffi::Error::Internal(std::string("LL kernel launch: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

}  // namespace jmep
