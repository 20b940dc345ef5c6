// Registration entry points that the CUDA part of the build provides.
#pragma once
#include <nanobind/nanobind.h>

namespace jmep {
#ifdef JMEP_WITH_CUDA
// channels/bindings.cc: Communicator and the channel test/bench kernels.
void bind_channels(nanobind::module_& m);
// handlers/bindings.cc: LL buffers and the XLA FFI handler capsules.
void bind_ll(nanobind::module_& m);
#endif
}  // namespace jmep
