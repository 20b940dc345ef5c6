// The instantiate stage every LL target shares. XLA runs it once per compiled
// custom call (when it builds the executable's thunk, before any execution)
// and keeps what it returns, the executable's FFI state, until the executable
// is destroyed. That state holds a reference to each of the Buffer's registry
// entries in this process, so the entries' device state lives as long as any
// executable that might replay a kernel reading it (CUDA graphs replay kernels
// without calling the execute handler). The execute stages still look entries
// up in the registry, so they do not depend on XLA handing the state back
// inside command buffers; Buffer.close() needs no jax.clear_caches().
#include <memory>
#include <vector>

#include "handlers/ll_attrs.h"
#include "handlers/ll_registry.h"
#include "handlers/ll_targets.h"
#include "xla/ffi/api/ffi.h"

namespace jmep {
namespace {
namespace ffi = xla::ffi;

struct LlRef {
  static ffi::TypeId id;  // XLA's id for this state type, set on first use
  std::vector<std::shared_ptr<LlEntry>> entries;
};
ffi::TypeId LlRef::id = {};

ffi::ErrorOr<std::unique_ptr<LlRef>> Instantiate(LlAttrs at) {
  if (at.buffer_id < 0)
    return ffi::Unexpected(ffi::Error::InvalidArgument("a jax_mscclpp_ep.Buffer is required on GPU"));
  auto ref = std::make_unique<LlRef>();
  ref->entries = ll_find_all(at.buffer_id);
  if (ref->entries.empty()) {
    if (ll_was_closed(at.buffer_id))
      return ffi::Unexpected(ffi::Error::InvalidArgument(ll_closed_message(at.buffer_id)));
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "no LL state for Buffer id " + std::to_string(at.buffer_id) + " in this process"));
  }
  return ref;
}

}  // namespace
}  // namespace jmep

XLA_FFI_DEFINE_HANDLER_SYMBOL(jmep_ll_instantiate_typed, jmep::Instantiate,
                              xla::ffi::Ffi::BindInstantiate().Attrs<jmep::LlAttrs>());

// The state type is registered with the XLA that calls us, through the API it
// passes in the call frame, before the first call can use it: no Python-side
// type registration (whose form differs across jax versions) is needed.
extern "C" XLA_FFI_Error* jmep_ll_instantiate(XLA_FFI_CallFrame* frame) {
  static XLA_FFI_Error* const registered = xla::ffi::Ffi::RegisterTypeId(
      frame->api, "jmep_ll_ref", &jmep::LlRef::id, xla::ffi::MakeTypeInfo<jmep::LlRef>());
  if (registered != nullptr) {  // a fresh error each time: XLA frees what we return
    XLA_FFI_Error_Create_Args args;
    args.struct_size = XLA_FFI_Error_Create_Args_STRUCT_SIZE;
    args.extension_start = nullptr;
    args.message = "jax_mscclpp_ep: could not register the LL FFI state type with XLA";
    args.errc = XLA_FFI_Error_Code_INTERNAL;
    return frame->api->XLA_FFI_Error_Create(&args);
  }
  return jmep_ll_instantiate_typed(frame);
}
