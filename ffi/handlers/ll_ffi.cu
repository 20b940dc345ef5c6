// XLA FFI handlers for LL dispatch / combine. They find the persistent state
// by (buffer_id attribute, device ordinal from the FFI context), check the
// shapes against it, and enqueue one kernel on XLA's stream: no host sync, no
// allocation, no per-call host state, so they are command-buffer compatible.
#include <cuda_runtime_api.h>

#include <string>

#include "handlers/ll_entry.cuh"
#include "handlers/ll_registry.h"

#if defined(JMEP_HAVE_XLA_FFI)
#include "handlers/ll_ffi_checks.h"

namespace jmep {
namespace {

ffi::Error DispatchImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
                        ffi::AnyBuffer topk_idx, ffi::Buffer<ffi::S32> stats,
                        ffi::Buffer<ffi::S32> order, ffi::Result<ffi::AnyBuffer> recv_x,
                        ffi::Result<ffi::AnyBuffer> recv_scales,
                        ffi::Result<ffi::Buffer<ffi::S32>> recv_count,
                        ffi::Result<ffi::Buffer<ffi::S32>> src_info,
                        ffi::Result<ffi::AnyBuffer> layout_range,
                        ffi::Result<ffi::Buffer<ffi::S32>> stats_out,
                        ffi::Result<ffi::Buffer<ffi::S32>> order_out, int64_t buffer_id,
                        int64_t num_experts, int64_t max_tokens, int64_t use_fp8,
                        int64_t round_scale, int64_t phases) {
  LlEntry* e = nullptr;
  if (auto err = find_checked(buffer_id, device, num_experts, max_tokens, &e); err.failure())
    return err;
  if (auto err = check_tokens(e->st, x, "x"); err.failure()) return err;
  auto xd = x.dimensions();
  LlDispatchArgs a{};
  if (auto err = check_topk(topk_idx, xd[0], &a.topk, &a.idx64); err.failure()) return err;
  const auto want = use_fp8 ? ffi::DataType::F8E4M3FN : ffi::DataType::BF16;
  if (recv_x->element_type() != want)
    return ffi::Error::InvalidArgument("recv_x dtype does not match use_fp8");
  if (stats.element_count() != e->st.local_experts)
    return ffi::Error::InvalidArgument("stats must have num_local_experts elements");
  a.s = e->st;
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
  a.num_tokens = static_cast<int32_t>(xd[0]);
  a.use_fp8 = use_fp8 != 0;
  a.round_scale = round_scale != 0;
  if (phases != kLlPhaseBoth && phases != kLlPhaseRecv)
    return ffi::Error::InvalidArgument("dispatch: phases must be 3 (whole call) or 2 (receive half)");
  a.phases = static_cast<int32_t>(phases);
  ensure_device(e->device);
  ll_launch_dispatch(a, e->num_blocks, stream);
  return launched();
}

ffi::Error CombineImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer y,
                       ffi::AnyBuffer topk_idx, ffi::Buffer<ffi::F32> topk_weights,
                       ffi::Buffer<ffi::S32> src_info, ffi::AnyBuffer layout_range,
                       ffi::Buffer<ffi::S32> order, ffi::Result<ffi::AnyBuffer> out,
                       ffi::Result<ffi::Buffer<ffi::S32>> order_out, int64_t buffer_id,
                       int64_t num_experts, int64_t max_tokens, int64_t phases) {
  LlEntry* e = nullptr;
  if (auto err = find_checked(buffer_id, device, num_experts, max_tokens, &e); err.failure())
    return err;
  const LlStatic& s = e->st;
  if (auto err = check_expert_rows(s, y); err.failure()) return err;
  auto od = out->dimensions();
  LlCombineArgs a{};
  if (auto err = check_topk(topk_idx, od[0], &a.topk, &a.idx64); err.failure()) return err;
  if (topk_weights.element_count() != size_t(od[0]) * a.topk)
    return ffi::Error::InvalidArgument("topk_weights must be [T, K]");
  if (layout_range.size_bytes() != size_t(s.local_experts) * s.nranks * 8)
    return ffi::Error::InvalidArgument("layout_range must hold [LE, R] int64");
  a.s = s;
  a.y = y.untyped_data();
  a.topk_idx = topk_idx.untyped_data();
  a.topk_weights = topk_weights.typed_data();
  a.src_info = src_info.typed_data();
  a.layout_range = static_cast<const int64_t*>(layout_range.untyped_data());
  a.order_in = order.typed_data();
  a.out = out->untyped_data();
  a.order_out = order_out->typed_data();
  a.num_tokens = static_cast<int32_t>(od[0]);
  if (phases != kLlPhaseBoth && phases != kLlPhaseRecv)
    return ffi::Error::InvalidArgument("combine: phases must be 3 (whole call) or 2 (receive half)");
  a.phases = static_cast<int32_t>(phases);
  ensure_device(e->device);
  ll_launch_combine(a, e->num_blocks, stream);
  return launched();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jmep_ll_dispatch_ffi, DispatchImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::DeviceOrdinal>()
        .Arg<ffi::AnyBuffer>()          // x
        .Arg<ffi::AnyBuffer>()          // topk_idx
        .Arg<ffi::Buffer<ffi::S32>>()   // stats
        .Arg<ffi::Buffer<ffi::S32>>()   // order
        .Ret<ffi::AnyBuffer>()          // recv_x
        .Ret<ffi::AnyBuffer>()          // recv_scales
        .Ret<ffi::Buffer<ffi::S32>>()   // recv_count
        .Ret<ffi::Buffer<ffi::S32>>()   // src_info
        .Ret<ffi::AnyBuffer>()          // layout_range
        .Ret<ffi::Buffer<ffi::S32>>()   // stats_out (aliases stats)
        .Ret<ffi::Buffer<ffi::S32>>()   // order_out (aliases order)
        .Attr<int64_t>("buffer_id")
        .Attr<int64_t>("num_experts")
        .Attr<int64_t>("max_tokens")
        .Attr<int64_t>("use_fp8")
        .Attr<int64_t>("round_scale")
        .Attr<int64_t>("phases"),
    {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jmep_ll_combine_ffi, CombineImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::DeviceOrdinal>()
        .Arg<ffi::AnyBuffer>()          // y
        .Arg<ffi::AnyBuffer>()          // topk_idx
        .Arg<ffi::Buffer<ffi::F32>>()   // topk_weights
        .Arg<ffi::Buffer<ffi::S32>>()   // src_info
        .Arg<ffi::AnyBuffer>()          // layout_range
        .Arg<ffi::Buffer<ffi::S32>>()   // order
        .Ret<ffi::AnyBuffer>()          // out
        .Ret<ffi::Buffer<ffi::S32>>()   // order_out (aliases order)
        .Attr<int64_t>("buffer_id")
        .Attr<int64_t>("num_experts")
        .Attr<int64_t>("max_tokens")
        .Attr<int64_t>("phases"),
    {ffi::Traits::kCmdBufferCompatible});

void* ll_dispatch_handler() { return reinterpret_cast<void*>(&jmep_ll_dispatch_ffi); }
void* ll_combine_handler() { return reinterpret_cast<void*>(&jmep_ll_combine_ffi); }

}  // namespace jmep

#else  // no XLA FFI headers: no handlers

namespace jmep {
void* ll_dispatch_handler() { return nullptr; }
void* ll_combine_handler() { return nullptr; }
}  // namespace jmep

#endif
