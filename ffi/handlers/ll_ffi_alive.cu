// FFI handler of jmep_ll_alive: which experts' ranks are not masked, read on the
// device (kernels/ll_alive.cu) so a router can route around a lost rank inside a
// jitted step and a CUDA graph (no host work per call).
#include "handlers/ll_call.h"
#include "kernels/ll_alive.h"

namespace jmep {
namespace {

ffi::Error Alive(cudaStream_t stream, int32_t device, ffi::Buffer<ffi::S32> order,
                 ffi::Result<ffi::Buffer<ffi::S32>> alive,
                 ffi::Result<ffi::Buffer<ffi::S32>> order_out, LlAttrs at) {
  std::shared_ptr<LlEntry> e;
  if (auto err = ll_entry_for(at, device, &e); err.failure()) return err;
  if (alive->element_count() != static_cast<size_t>(e->st.num_experts))
    return ffi::Error::InvalidArgument("alive must be int32 [E]");
  ll_launch_alive(e->st, alive->typed_data(), order.typed_data(), order_out->typed_data(), stream);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return ffi::Error::Internal(std::string("alive kernel launch: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jmep

using jmep::ffi::Buffer, jmep::ffi::S32;

XLA_FFI_DEFINE_HANDLER_SYMBOL(jmep_ll_alive_ffi, jmep::Alive,
                              jmep::ll_bind()
                                  .Arg<Buffer<S32>>()  // order
                                  .Ret<Buffer<S32>>()  // alive [E]
                                  .Ret<Buffer<S32>>()  // order_out
                                  .Attrs<jmep::LlAttrs>(),
                              {xla::ffi::Traits::kCmdBufferCompatible});
