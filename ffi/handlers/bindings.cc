// nanobind surface of the LL kernels: registry management for gpu.py and the
// FFI handler capsules it registers with XLA.
#include <nanobind/nanobind.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <memory>

#include "bindings.h"
#include "handlers/ll_registry.h"

#if __has_include("channels/communicator.h") && __has_include("channels/port_channel_device.cuh")
#define JMEP_LL_BIND_COMM 1
#include "channels/communicator.h"
#else
#define JMEP_LL_BIND_COMM 0
#endif

namespace nb = nanobind;

namespace jmep {

void bind_ll(nb::module_& m) {
  m.def("ll_size_hint", &ll_size_hint, nb::arg("max_tokens"), nb::arg("hidden"),
        nb::arg("num_ranks"), nb::arg("num_experts"),
        "Registered-buffer bytes the LL layout needs (= config.size_hint).");
  m.def("ll_enabled", &ll_enabled, "True when the LL kernels are compiled in.");
  m.def("ll_has_channels", &ll_has_channels, "True when the channel layer is compiled in.");
  m.def("ll_register_p2p", &ll_register_p2p, nb::arg("buffer_id"), nb::arg("devices"),
        nb::arg("max_tokens"), nb::arg("hidden"), nb::arg("num_experts"), nb::arg("timeout_s"),
        "Fallback without communicators: one process, direct CUDA peer access.");
#if JMEP_LL_BIND_COMM
  m.def(
      "ll_register",
      [](int64_t buffer_id, nb::object comm, int64_t max_tokens, int64_t hidden,
         int64_t num_experts) {
        auto c = nb::cast<std::shared_ptr<Communicator>>(comm);
        ll_register(buffer_id, std::move(c), max_tokens, hidden, num_experts);
      },
      nb::arg("buffer_id"), nb::arg("communicator"), nb::arg("max_tokens"), nb::arg("hidden"),
      nb::arg("num_experts"));
#endif
  m.def("ll_unregister", &ll_unregister, nb::arg("buffer_id"), nb::arg("device"));
  m.def("ll_check", &ll_check, nb::arg("buffer_id"), nb::arg("device"));
  m.def("ll_dropped", &ll_dropped, nb::arg("buffer_id"), nb::arg("device"));
  m.def("ll_timing", &ll_timing, nb::arg("buffer_id"), nb::arg("device"), nb::arg("reset") = false,
        "[dispatch calls, send ns, total ns, combine calls, send ns, total ns, then the summed "
        "phase probes of dispatch and of combine (JMEP_LL_PROBES builds)] (synchronises).");
  m.def("ffi_targets", []() {
    nb::dict d;
    if (void* p = ll_dispatch_handler()) d["jmep_ll_dispatch"] = nb::capsule(p);
    if (void* p = ll_combine_handler()) d["jmep_ll_combine"] = nb::capsule(p);
    if (void* p = ll_dispatch_send_handler()) d["jmep_ll_dispatch_send"] = nb::capsule(p);
    if (void* p = ll_combine_send_handler()) d["jmep_ll_combine_send"] = nb::capsule(p);
    if (void* p = ll_scatter_rows_handler()) d["jmep_ll_scatter_rows"] = nb::capsule(p);
    if (void* p = ll_gather_rows_handler()) d["jmep_ll_gather_rows"] = nb::capsule(p);
    return d;
  });
}

}  // namespace jmep
