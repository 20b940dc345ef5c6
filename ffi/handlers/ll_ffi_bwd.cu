// XLA FFI handlers for combine's backward pass, run by the LL kernels:
//  scatter_rows: gradient w.r.t. the expert outputs. A bf16 dispatch of the
//    output gradient g whose messages carry each expert's weight; rows land
//    where the forward handle put (source rank, token), via row_map.
//  gather_rows: for the gradient w.r.t. topk_weights, combine's exchange
//    without the reduction: out[t, k] = the row that held (t, topk_idx[t, k]).
// Same common work as ll_ffi.cu (ll_call); whole calls, so `phases`, `use_fp8`
// and `round_scale` are ignored.
#include "handlers/ll_call.h"

namespace jmep {
namespace {

ffi::Error ScatterRows(cudaStream_t stream, int32_t device, ffi::AnyBuffer g,
                       ffi::AnyBuffer topk_idx, ffi::Buffer<ffi::F32> topk_weights,
                       ffi::Buffer<ffi::S32> row_map, ffi::Buffer<ffi::S32> order,
                       ffi::Result<ffi::AnyBuffer> rows,
                       ffi::Result<ffi::Buffer<ffi::S32>> order_out, LlAttrs at) {
  return ll_call<LlDispatchArgs>(stream, device, at, [&](LlDispatchArgs& a) {
    const LlStatic& s = a.s;
    if (auto err = check_tokens(s, g, "g"); err.failure()) return err;
    const int64_t tokens = g.dimensions()[0];
    if (auto err = check_topk(topk_idx, tokens, &a.topk, &a.idx64); err.failure()) return err;
    const int64_t rows_per_expert = int64_t(s.nranks) * s.max_tokens;
    if (topk_weights.element_count() != size_t(tokens) * a.topk)
      return ffi::Error::InvalidArgument("topk_weights must be [T, K]");
    if (row_map.element_count() != size_t(s.local_experts) * rows_per_expert)
      return ffi::Error::InvalidArgument("row_map must be [LE, R*M]");
    if (rows->element_type() != ffi::DataType::BF16 ||
        rows->element_count() != size_t(s.local_experts) * rows_per_expert * s.hidden)
      return ffi::Error::InvalidArgument("rows must be bf16 [LE, R*M, H]");
    a.x = g.untyped_data();
    a.topk_idx = topk_idx.untyped_data();
    a.slot_weights = topk_weights.typed_data();
    a.row_map = row_map.typed_data();
    a.order_in = order.typed_data();
    a.order_out = order_out->typed_data();
    a.recv_x = rows->untyped_data();
    a.num_tokens = static_cast<int32_t>(tokens);
    a.phases = kLlPhaseBoth;
    return ffi::Error::Success();
  });
}

ffi::Error GatherRows(cudaStream_t stream, int32_t device, ffi::AnyBuffer y,
                      ffi::AnyBuffer topk_idx, ffi::Buffer<ffi::S32> src_info,
                      ffi::AnyBuffer layout_range, ffi::Buffer<ffi::S32> order,
                      ffi::Result<ffi::AnyBuffer> out,
                      ffi::Result<ffi::Buffer<ffi::S32>> order_out, LlAttrs at) {
  return ll_call<LlCombineArgs>(stream, device, at, [&](LlCombineArgs& a) {
    const LlStatic& s = a.s;
    if (auto err = check_expert_rows(s, y); err.failure()) return err;
    auto od = out->dimensions();
    if (out->element_type() != ffi::DataType::BF16 || od.size() != 3 || od[2] != s.hidden ||
        od[0] > s.max_tokens)
      return ffi::Error::InvalidArgument("gather_rows output must be bf16 [T, K, H]");
    if (auto err = check_topk(topk_idx, od[0], &a.topk, &a.idx64); err.failure()) return err;
    if (od[1] != a.topk) return ffi::Error::InvalidArgument("gather_rows output must be [T, K, H]");
    if (auto err = check_layout_range(s, layout_range); err.failure()) return err;
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
    return ffi::Error::Success();
  });
}

}  // namespace
}  // namespace jmep

using jmep::ffi::AnyBuffer, jmep::ffi::Buffer, jmep::ffi::S32, jmep::ffi::F32;

XLA_FFI_DEFINE_HANDLER_SYMBOL(jmep_ll_scatter_rows_ffi, jmep::ScatterRows,
                              jmep::ll_bind()
                                  .Arg<AnyBuffer>()    // g
                                  .Arg<AnyBuffer>()    // topk_idx
                                  .Arg<Buffer<F32>>()  // topk_weights
                                  .Arg<Buffer<S32>>()  // row_map
                                  .Arg<Buffer<S32>>()  // order
                                  .Ret<AnyBuffer>()    // rows
                                  .Ret<Buffer<S32>>()  // order_out (aliases order)
                                  .Attrs<jmep::LlAttrs>(),
                              {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(jmep_ll_gather_rows_ffi, jmep::GatherRows,
                              jmep::ll_bind()
                                  .Arg<AnyBuffer>()    // y
                                  .Arg<AnyBuffer>()    // topk_idx
                                  .Arg<Buffer<S32>>()  // src_info
                                  .Arg<AnyBuffer>()    // layout_range
                                  .Arg<Buffer<S32>>()  // order
                                  .Ret<AnyBuffer>()    // out [T, K, H]
                                  .Ret<Buffer<S32>>()  // order_out (aliases order)
                                  .Attrs<jmep::LlAttrs>(),
                              {xla::ffi::Traits::kCmdBufferCompatible});
