// nanobind module: build facts and, when CUDA is compiled in, the host objects
// (communicators, LL buffers) and the XLA FFI handler capsules.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <string>

#include "bindings.h"
#ifdef JMEP_WITH_CUDA
#include "kernels/arch_probe.h"
#endif

namespace nb = nanobind;

#ifndef JMEP_VERSION
#define JMEP_VERSION "0.0.0"
#endif

NB_MODULE(_ep, m) {
  m.doc() = "jax_mscclpp_ep native module";
  m.def("version", []() { return std::string(JMEP_VERSION); });
#ifdef JMEP_WITH_CUDA
  m.def("cuda_enabled", []() { return true; });
  m.def("cuda_archs", []() { return std::string(JMEP_CUDA_ARCHS); },
        "The CUDA architectures compiled in (CMake list, comma-separated).");
  m.def("kernel_image_error", &jmep::kernel_image_error, nb::arg("device"),
        "'' when that GPU can run the kernels, else the CUDA error text.");
  m.def("compute_capability", &jmep::compute_capability, nb::arg("device"));
  jmep::bind_channels(m);
  jmep::bind_ll(m);
#else
  m.def("cuda_enabled", []() { return false; });
#endif
}
