// nanobind module: build facts, the kernels' limits and, when CUDA is compiled
// in (decided once, in CMakeLists.txt), the host objects (communicators, LL
// buffers) and the XLA FFI handler bundles.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <string>

#include "bindings.h"
#include "kernels/ll_limits.h"
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
  m.def(
      "ll_limits",
      []() {
        nb::dict d;
        for (const jmep::LlLimit& l : jmep::kLlLimits) d[l.name] = l.value;
        return d;
      },
      "{config.py name: value} of the kernels' limits (ffi/kernels/ll_limits.h).");
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
