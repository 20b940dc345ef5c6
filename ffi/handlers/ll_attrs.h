// The attributes every LL custom call carries, decoded once into LlAttrs.
// JMEP_LL_ATTRS is the contract with the Python lowering: lowering.py builds each
// call's attribute dict from _ep.ll_attributes() (this list, in this order), so
// adding an attribute is one line here plus the primitive param of that name.
// Every handler receives all of them; a handler ignores those it has no use for
// (send halves and the backward calls ignore `phases`).
#pragma once
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

// X(C++ type, name); int64_t travels as an i64 attribute, bool as a bool (PRED)
// attribute: jax.ffi turns a Python bool into ir.BoolAttr, which XLA passes as
// a PRED scalar (XLA_FFI_REGISTER_SCALAR_ATTR_DECODING(bool, PRED) decodes it).
#define JMEP_LL_ATTRS(X, SEP)                                             \
  X(int64_t, buffer_id) SEP    /* Buffer.id; < 0: no Buffer (refused) */  \
  X(int64_t, num_experts) SEP  /* E, checked against the Buffer */       \
  X(int64_t, max_tokens) SEP   /* M, checked against the Buffer */       \
  X(bool, use_fp8) SEP         /* dispatch: fp8 payload with scales */    \
  X(bool, round_scale) SEP     /* dispatch: power-of-two scales */       \
  X(int64_t, phases)           /* 3 whole call, 2 receive half */

#define JMEP_LL_COMMA ,
#define JMEP_LL_MEMBER(type, name) type name;
#define JMEP_LL_DECODE(type, name) ::xla::ffi::StructMember<type>(#name)

namespace jmep {

struct LlAttrs {
  JMEP_LL_ATTRS(JMEP_LL_MEMBER, )
};

template <typename T>
constexpr const char* ll_attr_kind() {
  static_assert(std::is_same_v<T, int64_t> || std::is_same_v<T, bool>,
                "the Python lowering passes i64 and bool attributes only");
  return std::is_same_v<T, bool> ? "bool" : "i64";
}

#define JMEP_LL_ROW(type, name) {#name, ll_attr_kind<type>()}
// (name, "i64" | "bool") in struct order: what _ep.ll_attributes() returns.
inline std::vector<std::pair<std::string, std::string>> ll_attribute_list() {
  return {JMEP_LL_ATTRS(JMEP_LL_ROW, JMEP_LL_COMMA)};
}
#undef JMEP_LL_ROW

}  // namespace jmep

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jmep::LlAttrs, JMEP_LL_ATTRS(JMEP_LL_DECODE, JMEP_LL_COMMA));
