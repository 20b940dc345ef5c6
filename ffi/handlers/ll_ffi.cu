// XLA FFI handlers for LL dispatch / combine (whole calls, and with phases = 2
// the receive halves of the split API). The common work is ll_call (ll_call.h);
// here each handler checks its buffers and points the kernel arguments at them.
#include "handlers/ll_call.h"

namespace jmep {
namespace {

ffi::Error Dispatch(cudaStream_t stream, int32_t device, ffi::AnyBuffer x, ffi::AnyBuffer topk_idx,
                    ffi::Buffer<ffi::S32> stats, ffi::Buffer<ffi::S32> order,
                    ffi::Result<ffi::AnyBuffer> recv_x, ffi::Result<ffi::AnyBuffer> recv_scales,
                    ffi::Result<ffi::Buffer<ffi::S32>> recv_count,
                    ffi::Result<ffi::Buffer<ffi::S32>> src_info,
                    ffi::Result<ffi::AnyBuffer> layout_range,
                    ffi::Result<ffi::Buffer<ffi::S32>> stats_out,
                    ffi::Result<ffi::Buffer<ffi::S32>> order_out, LlAttrs at) {
  return ll_call<LlDispatchArgs>(stream, device, at, [&](LlDispatchArgs& a) {
    if (auto err = check_phases(at, "dispatch"); err.failure()) return err;
    if (auto err = check_tokens(a.s, x, "x"); err.failure()) return err;
    const int64_t tokens = x.dimensions()[0];
    if (auto err = check_topk(topk_idx, tokens, &a.topk, &a.idx64); err.failure()) return err;
    const auto want = at.use_fp8 ? ffi::DataType::F8E4M3FN : ffi::DataType::BF16;
    if (recv_x->element_type() != want)
      return ffi::Error::InvalidArgument("recv_x dtype does not match use_fp8");
    if (stats.element_count() != size_t(a.s.local_experts))
      return ffi::Error::InvalidArgument("stats must have num_local_experts elements");
    a.x = x.untyped_data();
    a.topk_idx = topk_idx.untyped_data();
    a.stats_in = stats.typed_data();
    a.order_in = order.typed_data();
    a.recv_x = recv_x->untyped_data();
    a.recv_scales = static_cast<float*>(recv_scales->untyped_data());
    a.recv_count = recv_count->typed_data();
    a.src_info = src_info->typed_data();
    a.layout_range = static_cast<int64_t*>(layout_range->untyped_data());  // same bytes either dtype
    a.stats_out = stats_out->typed_data();
    a.order_out = order_out->typed_data();
    a.num_tokens = static_cast<int32_t>(tokens);
    a.use_fp8 = at.use_fp8;
    a.round_scale = at.round_scale;
    a.phases = static_cast<int32_t>(at.phases);
    return ffi::Error::Success();
  });
}

ffi::Error Combine(cudaStream_t stream, int32_t device, ffi::AnyBuffer y, ffi::AnyBuffer topk_idx,
                   ffi::Buffer<ffi::F32> topk_weights, ffi::Buffer<ffi::S32> src_info,
                   ffi::AnyBuffer layout_range, ffi::Buffer<ffi::S32> order,
                   ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::S32>> order_out,
                   LlAttrs at) {
  return ll_call<LlCombineArgs>(stream, device, at, [&](LlCombineArgs& a) {
    if (auto err = check_phases(at, "combine"); err.failure()) return err;
    if (auto err = check_expert_rows(a.s, y); err.failure()) return err;
    const int64_t tokens = out->dimensions()[0];
    if (auto err = check_topk(topk_idx, tokens, &a.topk, &a.idx64); err.failure()) return err;
    if (topk_weights.element_count() != size_t(tokens) * a.topk)
      return ffi::Error::InvalidArgument("topk_weights must be [T, K]");
    if (auto err = check_layout_range(a.s, layout_range); err.failure()) return err;
    a.y = y.untyped_data();
    a.topk_idx = topk_idx.untyped_data();
    a.topk_weights = topk_weights.typed_data();
    a.src_info = src_info.typed_data();
    a.layout_range = static_cast<const int64_t*>(layout_range.untyped_data());
    a.order_in = order.typed_data();
    a.out = out->untyped_data();
    a.order_out = order_out->typed_data();
    a.num_tokens = static_cast<int32_t>(tokens);
    a.phases = static_cast<int32_t>(at.phases);
    return ffi::Error::Success();
  });
}

}  // namespace
}  // namespace jmep

using jmep::ffi::AnyBuffer, jmep::ffi::Buffer, jmep::ffi::S32, jmep::ffi::F32;

XLA_FFI_DEFINE_HANDLER_SYMBOL(jmep_ll_dispatch_ffi, jmep::Dispatch,
                              jmep::ll_bind()
                                  .Arg<AnyBuffer>()    // x
                                  .Arg<AnyBuffer>()    // topk_idx
                                  .Arg<Buffer<S32>>()  // stats
                                  .Arg<Buffer<S32>>()  // order
                                  .Ret<AnyBuffer>()    // recv_x
                                  .Ret<AnyBuffer>()    // recv_scales
                                  .Ret<Buffer<S32>>()  // recv_count
                                  .Ret<Buffer<S32>>()  // src_info
                                  .Ret<AnyBuffer>()    // layout_range
                                  .Ret<Buffer<S32>>()  // stats_out (aliases stats)
                                  .Ret<Buffer<S32>>()  // order_out (aliases order)
                                  .Attrs<jmep::LlAttrs>(),
                              {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(jmep_ll_combine_ffi, jmep::Combine,
                              jmep::ll_bind()
                                  .Arg<AnyBuffer>()    // y
                                  .Arg<AnyBuffer>()    // topk_idx
                                  .Arg<Buffer<F32>>()  // topk_weights
                                  .Arg<Buffer<S32>>()  // src_info
                                  .Arg<AnyBuffer>()    // layout_range
                                  .Arg<Buffer<S32>>()  // order
                                  .Ret<AnyBuffer>()    // out
                                  .Ret<Buffer<S32>>()  // order_out (aliases order)
                                  .Attrs<jmep::LlAttrs>(),
                              {xla::ffi::Traits::kCmdBufferCompatible});
