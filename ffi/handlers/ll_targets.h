// The XLA FFI handler symbols: each target's execute stage (ll_ffi.cu,
// ll_ffi_split.cu, ll_ffi_bwd.cu, ll_ffi_alive.cu) and the instantiate stage they all share
// (ll_ref.cc). ll_ffi_targets() pairs them up for registration.
#pragma once
#include "xla/ffi/api/c_api.h"

extern "C" {
XLA_FFI_Error* jmep_ll_instantiate(XLA_FFI_CallFrame* frame);
XLA_FFI_Error* jmep_ll_dispatch_ffi(XLA_FFI_CallFrame* frame);
XLA_FFI_Error* jmep_ll_combine_ffi(XLA_FFI_CallFrame* frame);
XLA_FFI_Error* jmep_ll_dispatch_send_ffi(XLA_FFI_CallFrame* frame);
XLA_FFI_Error* jmep_ll_combine_send_ffi(XLA_FFI_CallFrame* frame);
XLA_FFI_Error* jmep_ll_scatter_rows_ffi(XLA_FFI_CallFrame* frame);
XLA_FFI_Error* jmep_ll_gather_rows_ffi(XLA_FFI_CallFrame* frame);
XLA_FFI_Error* jmep_ll_alive_ffi(XLA_FFI_CallFrame* frame);
}

namespace jmep {

struct LlTarget {
  const char* name;  // the custom call target lowering.py lowers to
  XLA_FFI_Handler* instantiate;
  XLA_FFI_Handler* execute;
};

inline constexpr LlTarget kLlTargets[] = {
    {"jmep_ll_dispatch", jmep_ll_instantiate, jmep_ll_dispatch_ffi},
    {"jmep_ll_combine", jmep_ll_instantiate, jmep_ll_combine_ffi},
    {"jmep_ll_dispatch_send", jmep_ll_instantiate, jmep_ll_dispatch_send_ffi},
    {"jmep_ll_combine_send", jmep_ll_instantiate, jmep_ll_combine_send_ffi},
    {"jmep_ll_scatter_rows", jmep_ll_instantiate, jmep_ll_scatter_rows_ffi},
    {"jmep_ll_gather_rows", jmep_ll_instantiate, jmep_ll_gather_rows_ffi},
    {"jmep_ll_alive", jmep_ll_instantiate, jmep_ll_alive_ffi},
};

}  // namespace jmep
