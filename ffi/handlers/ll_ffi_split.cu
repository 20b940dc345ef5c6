// XLA FFI handlers for the send halves of split dispatch / combine. A send
// half runs only the kernels' send (and publish) phase and passes the order
// token through; the receive half is the whole-call handler with phases = 2
// (ll_ffi.cu). Between the two, XLA may schedule other work (the other
// micro-batch's experts) while the data travels. `phases` is ignored here.
#include "handlers/ll_call.h"

namespace jmep {
namespace {

ffi::Error DispatchSend(cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
                        ffi::AnyBuffer topk_idx, ffi::Buffer<ffi::S32> order,
                        ffi::Result<ffi::Buffer<ffi::S32>> order_out, LlAttrs at) {
  return ll_call<LlDispatchArgs>(stream, device, at, [&](LlDispatchArgs& a) {
    if (auto err = check_tokens(a.s, x, "x"); err.failure()) return err;
    const int64_t tokens = x.dimensions()[0];
    if (auto err = check_topk(topk_idx, tokens, &a.topk, &a.idx64); err.failure()) return err;
    a.x = x.untyped_data();
    a.topk_idx = topk_idx.untyped_data();
    a.order_in = order.typed_data();
    a.order_out = order_out->typed_data();
    a.num_tokens = static_cast<int32_t>(tokens);
    a.use_fp8 = at.use_fp8;
    a.round_scale = at.round_scale;
    a.phases = kLlPhaseSend;
    return ffi::Error::Success();
  });
}

ffi::Error CombineSend(cudaStream_t stream, int32_t device, ffi::AnyBuffer y,
                       ffi::Buffer<ffi::S32> src_info, ffi::AnyBuffer layout_range,
                       ffi::Buffer<ffi::S32> order, ffi::Result<ffi::Buffer<ffi::S32>> order_out,
                       LlAttrs at) {
  return ll_call<LlCombineArgs>(stream, device, at, [&](LlCombineArgs& a) {
    if (auto err = check_expert_rows(a.s, y); err.failure()) return err;
    if (auto err = check_layout_range(a.s, layout_range); err.failure()) return err;
    a.y = y.untyped_data();
    a.src_info = src_info.typed_data();
    a.layout_range = static_cast<const int64_t*>(layout_range.untyped_data());
    a.order_in = order.typed_data();
    a.order_out = order_out->typed_data();
    a.phases = kLlPhaseSend;
    return ffi::Error::Success();
  });
}

}  // namespace
}  // namespace jmep

using jmep::ffi::AnyBuffer, jmep::ffi::Buffer, jmep::ffi::S32;

XLA_FFI_DEFINE_HANDLER_SYMBOL(jmep_ll_dispatch_send_ffi, jmep::DispatchSend,
                              jmep::ll_bind()
                                  .Arg<AnyBuffer>()    // x
                                  .Arg<AnyBuffer>()    // topk_idx
                                  .Arg<Buffer<S32>>()  // order
                                  .Ret<Buffer<S32>>()  // order_out (aliases order)
                                  .Attrs<jmep::LlAttrs>(),
                              {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(jmep_ll_combine_send_ffi, jmep::CombineSend,
                              jmep::ll_bind()
                                  .Arg<AnyBuffer>()    // y
                                  .Arg<Buffer<S32>>()  // src_info
                                  .Arg<AnyBuffer>()    // layout_range
                                  .Arg<Buffer<S32>>()  // order
                                  .Ret<Buffer<S32>>()  // order_out (aliases order)
                                  .Attrs<jmep::LlAttrs>(),
                              {xla::ffi::Traits::kCmdBufferCompatible});
