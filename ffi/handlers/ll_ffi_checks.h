// Checks shared by the LL FFI handlers (fused calls and split halves): find the
// Buffer's state, refuse a failed Buffer, check shapes, report launch errors.
#pragma once
#include <cuda_runtime_api.h>

#include <string>

#include "handlers/ll_entry.cuh"
#include "handlers/ll_registry.h"
#include "xla/ffi/api/ffi.h"

namespace jmep {
namespace ffi = xla::ffi;

inline ffi::Error find_entry(int64_t buffer_id, int32_t device, LlEntry** out) {
  if (buffer_id < 0)
    return ffi::Error::InvalidArgument("a jax_mscclpp_ep.Buffer is required on GPU");
  *out = ll_find(buffer_id, device);
  if (*out == nullptr)
    return ffi::Error::InvalidArgument(
        "no LL state for Buffer id " + std::to_string(buffer_id) + " on device " +
        std::to_string(device) + ": was the Buffer created on this device, or closed?");
  // An earlier call that timed out left the state undefined: refuse, naming it.
  // (Inside a replayed CUDA graph this host check does not run; Buffer.check() does.)
  if (std::string f = ll_failure(**out); !f.empty()) return ffi::Error::Internal(f);
  return ffi::Error::Success();
}

inline ffi::Error check_static(const LlEntry& e, int64_t num_experts, int64_t max_tokens) {
  if (num_experts != e.st.num_experts || max_tokens != e.st.max_tokens)
    return ffi::Error::InvalidArgument("dispatch/combine shape does not match the Buffer's config");
  return ffi::Error::Success();
}

// find_entry + check_static: the prologue of every handler.
inline ffi::Error find_checked(int64_t buffer_id, int32_t device, int64_t num_experts,
                               int64_t max_tokens, LlEntry** out) {
  if (auto err = find_entry(buffer_id, device, out); err.failure()) return err;
  return check_static(**out, num_experts, max_tokens);
}

inline ffi::Error check_topk(ffi::AnyBuffer idx, int64_t tokens, int32_t* k, bool* idx64) {
  auto d = idx.dimensions();
  if (d.size() != 2 || d[0] != tokens || d[1] < 1 || d[1] > kLlMaxTopk)
    return ffi::Error::InvalidArgument("topk_idx must be [T, K] with 1 <= K <= 16");
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

// XLA normally has the stream's device current already; make sure of it, since
// a launch on another device's stream fails.
inline void ensure_device(int device) {
  int cur = -1;
  if (cudaGetDevice(&cur) == cudaSuccess && cur != device) cudaSetDevice(device);
}

inline ffi::Error launched() {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("LL kernel launch: ") +
                                                      cudaGetErrorString(err));
  return ffi::Error::Success();
}

}  // namespace jmep
