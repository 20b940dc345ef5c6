// XLA FFI handlers for combine's backward pass, run by the LL kernels:
//  scatter_rows: gradient w.r.t. the expert outputs. A bf16 dispatch of the
//    output gradient g whose messages carry each expert's weight; rows land
//    where the forward handle put (source rank, token), via row_map.
//  gather_rows: for the gradient w.r.t. topk_weights, combine's exchange
//    without the reduction: out[t, k] = the row that held (t, topk_idx[t, k]).
// Same rules as ll_ffi.cu: state by (buffer_id, device), no host sync.
#include <cuda_runtime_api.h>

#include "handlers/ll_registry.h"

#if defined(JMEP_HAVE_XLA_FFI)
#include "handlers/ll_ffi_checks.h"

namespace jmep {
namespace {

ffi::Error ScatterRowsImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer g,
                           ffi::AnyBuffer topk_idx, ffi::Buffer<ffi::F32> topk_weights,
                           ffi::Buffer<ffi::S32> row_map, ffi::Buffer<ffi::S32> order,
                           ffi::Result<ffi::AnyBuffer> rows,
                           ffi::Result<ffi::Buffer<ffi::S32>> order_out, int64_t buffer_id,
                           int64_t num_experts, int64_t max_tokens) {
  LlEntry* e = nullptr;
  if (auto err = find_checked(buffer_id, device, num_experts, max_tokens, &e); err.failure())
    return err;
  const LlStatic& s = e->st;
  if (auto err = check_tokens(s, g, "g"); err.failure()) return err;
  auto gd = g.dimensions();
  LlDispatchArgs a{};
  if (auto err = check_topk(topk_idx, gd[0], &a.topk, &a.idx64); err.failure()) return err;
  const int64_t rows_per_expert = int64_t(s.nranks) * s.max_tokens;
  if (topk_weights.element_count() != size_t(gd[0]) * a.topk)
    return ffi::Error::InvalidArgument("topk_weights must be [T, K]");
  if (row_map.element_count() != size_t(s.local_experts) * rows_per_expert)
    return ffi::Error::InvalidArgument("row_map must be [LE, R*M]");
  if (rows->element_type() != ffi::DataType::BF16 ||
      rows->element_count() != size_t(s.local_experts) * rows_per_expert * s.hidden)
    return ffi::Error::InvalidArgument("rows must be bf16 [LE, R*M, H]");
  a.s = s;
  a.x = g.untyped_data();
  a.topk_idx = topk_idx.untyped_data();
  a.slot_weights = topk_weights.typed_data();
  a.row_map = row_map.typed_data();
  a.order_in = order.typed_data();
  a.order_out = order_out->typed_data();
  a.recv_x = rows->untyped_data();
  a.num_tokens = static_cast<int32_t>(gd[0]);
  a.phases = kLlPhaseBoth;
  ensure_device(e->device);
  ll_launch_dispatch(a, e->num_blocks, stream);
  return launched();
}

ffi::Error GatherRowsImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer y,
                          ffi::AnyBuffer topk_idx, ffi::Buffer<ffi::S32> src_info,
                          ffi::AnyBuffer layout_range, ffi::Buffer<ffi::S32> order,
                          ffi::Result<ffi::AnyBuffer> out,
                          ffi::Result<ffi::Buffer<ffi::S32>> order_out, int64_t buffer_id,
                          int64_t num_experts, int64_t max_tokens) {
  LlEntry* e = nullptr;
  if (auto err = find_checked(buffer_id, device, num_experts, max_tokens, &e); err.failure())
    return err;
  const LlStatic& s = e->st;
  if (auto err = check_expert_rows(s, y); err.failure()) return err;
  auto od = out->dimensions();
  if (out->element_type() != ffi::DataType::BF16 || od.size() != 3 || od[2] != s.hidden ||
      od[0] > s.max_tokens)
    return ffi::Error::InvalidArgument("gather_rows output must be bf16 [T, K, H]");
  LlCombineArgs a{};
  if (auto err = check_topk(topk_idx, od[0], &a.topk, &a.idx64); err.failure()) return err;
  if (od[1] != a.topk) return ffi::Error::InvalidArgument("gather_rows output must be [T, K, H]");
  if (layout_range.size_bytes() != size_t(s.local_experts) * s.nranks * 8)
    return ffi::Error::InvalidArgument("layout_range must hold [LE, R] int64");
  a.s = s;
  a.y = y.untyped_data();
  a.topk_idx = topk_idx.untyped_data();
  a.src_info = src_info.typed_data();
  a.layout_range = static_cast<const int64_t*>(layout_range.untyped_data());
  a.order_in = order.typed_data();
  a.out = out->untyped_data();
  a.order_out = order_out->typed_data();
  a.num_tokens = static_cast<int32_t>(od[0]);
  a.phases = kLlPhaseBoth;
  a.per_slot = true;
  ensure_device(e->device);
  ll_launch_combine(a, e->num_blocks, stream);
  return launched();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jmep_ll_scatter_rows_ffi, ScatterRowsImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::DeviceOrdinal>()
        .Arg<ffi::AnyBuffer>()          // g
        .Arg<ffi::AnyBuffer>()          // topk_idx
        .Arg<ffi::Buffer<ffi::F32>>()   // topk_weights
        .Arg<ffi::Buffer<ffi::S32>>()   // row_map
        .Arg<ffi::Buffer<ffi::S32>>()   // order
        .Ret<ffi::AnyBuffer>()          // rows
        .Ret<ffi::Buffer<ffi::S32>>()   // order_out (aliases order)
        .Attr<int64_t>("buffer_id")
        .Attr<int64_t>("num_experts")
        .Attr<int64_t>("max_tokens"),
    {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jmep_ll_gather_rows_ffi, GatherRowsImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::DeviceOrdinal>()
        .Arg<ffi::AnyBuffer>()          // y
        .Arg<ffi::AnyBuffer>()          // topk_idx
        .Arg<ffi::Buffer<ffi::S32>>()   // src_info
        .Arg<ffi::AnyBuffer>()          // layout_range
        .Arg<ffi::Buffer<ffi::S32>>()   // order
        .Ret<ffi::AnyBuffer>()          // out [T, K, H]
        .Ret<ffi::Buffer<ffi::S32>>()   // order_out (aliases order)
        .Attr<int64_t>("buffer_id")
        .Attr<int64_t>("num_experts")
        .Attr<int64_t>("max_tokens"),
    {ffi::Traits::kCmdBufferCompatible});

void* ll_scatter_rows_handler() { return reinterpret_cast<void*>(&jmep_ll_scatter_rows_ffi); }
void* ll_gather_rows_handler() { return reinterpret_cast<void*>(&jmep_ll_gather_rows_ffi); }

}  // namespace jmep

#else  // no XLA FFI headers: no handlers

namespace jmep {
void* ll_scatter_rows_handler() { return nullptr; }
void* ll_gather_rows_handler() { return nullptr; }
}  // namespace jmep

#endif
