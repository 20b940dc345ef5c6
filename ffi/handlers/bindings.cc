// nanobind surface of the LL kernels: registry management for gpu.py, the
// attribute contract of the FFI handlers and the handler bundles lowering.py
// registers with XLA.
#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <memory>

#include "bindings.h"
#include "channels/communicator.h"
#include "handlers/ll_attrs.h"
#include "handlers/ll_registry.h"
#include "handlers/ll_targets.h"

namespace nb = nanobind;

namespace jmep {

void bind_ll(nb::module_& m) {
  m.def("ll_size_hint", &ll_size_hint, nb::arg("max_tokens"), nb::arg("hidden"),
        nb::arg("num_ranks"), nb::arg("num_experts"),
        "Registered-buffer bytes the LL layout needs (= config.size_hint).");
  m.def("ll_register_p2p", &ll_register_p2p, nb::arg("buffer_id"), nb::arg("devices"),
        nb::arg("max_tokens"), nb::arg("hidden"), nb::arg("num_experts"), nb::arg("timeout_s"),
        "Fallback without communicators: one process, direct CUDA peer access.");
  m.def("ll_register", &ll_register, nb::arg("buffer_id"), nb::arg("communicator"),
        nb::arg("max_tokens"), nb::arg("hidden"), nb::arg("num_experts"));
  m.def("ll_unregister", &ll_unregister, nb::arg("buffer_id"), nb::arg("device"));
  m.def("ll_check", &ll_check, nb::arg("buffer_id"), nb::arg("device"));
  m.def("ll_dropped", &ll_dropped, nb::arg("buffer_id"), nb::arg("device"));
  m.def("ll_timing", &ll_timing, nb::arg("buffer_id"), nb::arg("device"), nb::arg("reset") = false,
        "[dispatch calls, send ns, total ns, combine calls, send ns, total ns, then the summed "
        "phase probes of dispatch and of combine (JMEP_LL_PROBES builds)] (synchronises).");
  m.def("ll_attributes", &ll_attribute_list,
        "[(name, 'i64' | 'bool')] in LlAttrs order: the attributes every LL custom call "
        "takes (ffi/handlers/ll_attrs.h).");
  m.def(
      "ffi_targets",
      []() {
        nb::list out;
        for (const LlTarget& t : kLlTargets) {
          nb::dict bundle;
          bundle["instantiate"] = nb::capsule(reinterpret_cast<void*>(t.instantiate));
          bundle["execute"] = nb::capsule(reinterpret_cast<void*>(t.execute));
          out.append(nb::make_tuple(t.name, bundle));
        }
        return out;
      },
      "[(target name, {'instantiate': capsule, 'execute': capsule})]: each pair is what "
      "jax.ffi.register_ffi_target(name, X, platform='CUDA') takes.");
}

}  // namespace jmep
