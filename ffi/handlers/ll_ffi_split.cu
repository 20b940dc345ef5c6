// XLA FFI handlers for the send halves of split dispatch / combine. A send
// half runs only the kernels' send (and publish) phase and passes the order
// token through; the receive half is the whole-call handler with phases = 2
// (ll_ffi.cu). Between the two, XLA may schedule other work (the other
// micro-batch's experts) while the data travels.
#include <cuda_runtime_api.h>

#include "handlers/ll_registry.h"

#if defined(JMEP_HAVE_XLA_FFI)
#include "handlers/ll_ffi_checks.h"

namespace jmep {
namespace {

ffi::Error DispatchSendImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
                            ffi::AnyBuffer topk_idx, ffi::Buffer<ffi::S32> order,
                            ffi::Result<ffi::Buffer<ffi::S32>> order_out, int64_t buffer_id,
                            int64_t num_experts, int64_t max_tokens, int64_t use_fp8,
                            int64_t round_scale) {
  LlEntry* e = nullptr;
  if (auto err = find_checked(buffer_id, device, num_experts, max_tokens, &e); err.failure())
    return err;
  if (auto err = check_tokens(e->st, x, "x"); err.failure()) return err;
  auto xd = x.dimensions();
  LlDispatchArgs a{};
  if (auto err = check_topk(topk_idx, xd[0], &a.topk, &a.idx64); err.failure()) return err;
  a.s = e->st;
  a.x = x.untyped_data();
  a.topk_idx = topk_idx.untyped_data();
  a.order_in = order.typed_data();
  a.order_out = order_out->typed_data();
  a.num_tokens = static_cast<int32_t>(xd[0]);
  a.use_fp8 = use_fp8 != 0;
  a.round_scale = round_scale != 0;
  a.phases = kLlPhaseSend;
  ensure_device(e->device);
  ll_launch_dispatch(a, e->num_blocks, stream);
  return launched();
}

ffi::Error CombineSendImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer y,
                           ffi::Buffer<ffi::S32> src_info, ffi::AnyBuffer layout_range,
                           ffi::Buffer<ffi::S32> order,
                           ffi::Result<ffi::Buffer<ffi::S32>> order_out, int64_t buffer_id,
                           int64_t num_experts, int64_t max_tokens) {
  LlEntry* e = nullptr;
  if (auto err = find_checked(buffer_id, device, num_experts, max_tokens, &e); err.failure())
    return err;
  const LlStatic& s = e->st;
  if (auto err = check_expert_rows(s, y); err.failure()) return err;
  if (layout_range.size_bytes() != size_t(s.local_experts) * s.nranks * 8)
    return ffi::Error::InvalidArgument("layout_range must hold [LE, R] int64");
  LlCombineArgs a{};
  a.s = s;
  a.y = y.untyped_data();
  a.src_info = src_info.typed_data();
  a.layout_range = static_cast<const int64_t*>(layout_range.untyped_data());
  a.order_in = order.typed_data();
  a.order_out = order_out->typed_data();
  a.phases = kLlPhaseSend;
  ensure_device(e->device);
  ll_launch_combine(a, e->num_blocks, stream);
  return launched();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jmep_ll_dispatch_send_ffi, DispatchSendImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::DeviceOrdinal>()
        .Arg<ffi::AnyBuffer>()          // x
        .Arg<ffi::AnyBuffer>()          // topk_idx
        .Arg<ffi::Buffer<ffi::S32>>()   // order
        .Ret<ffi::Buffer<ffi::S32>>()   // order_out (aliases order)
        .Attr<int64_t>("buffer_id")
        .Attr<int64_t>("num_experts")
        .Attr<int64_t>("max_tokens")
        .Attr<int64_t>("use_fp8")
        .Attr<int64_t>("round_scale"),
    {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jmep_ll_combine_send_ffi, CombineSendImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::DeviceOrdinal>()
        .Arg<ffi::AnyBuffer>()          // y
        .Arg<ffi::Buffer<ffi::S32>>()   // src_info
        .Arg<ffi::AnyBuffer>()          // layout_range
        .Arg<ffi::Buffer<ffi::S32>>()   // order
        .Ret<ffi::Buffer<ffi::S32>>()   // order_out (aliases order)
        .Attr<int64_t>("buffer_id")
        .Attr<int64_t>("num_experts")
        .Attr<int64_t>("max_tokens"),
    {ffi::Traits::kCmdBufferCompatible});

void* ll_dispatch_send_handler() { return reinterpret_cast<void*>(&jmep_ll_dispatch_send_ffi); }
void* ll_combine_send_handler() { return reinterpret_cast<void*>(&jmep_ll_combine_send_ffi); }

}  // namespace jmep

#else  // no XLA FFI headers: no handlers

namespace jmep {
void* ll_dispatch_send_handler() { return nullptr; }
void* ll_combine_send_handler() { return nullptr; }
}  // namespace jmep

#endif
