// nanobind surface of the LL kernels: registry management for gpu.py, the
// attribute contract of the FFI handlers and the handler bundles lowering.py
// registers with XLA.
#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <memory>

#include "bindings.h"
#include "channels/communicator.h"
#include "handlers/ll_attrs.h"
#include "handlers/ll_mask.h"
#include "handlers/ll_registry.h"
#include "handlers/ll_targets.h"
#include "kernels/ll_divisor.h"
#include "kernels/ll_grid.h"

namespace nb = nanobind;

namespace jmep {

void bind_ll(nb::module_& m) {
  m.def("ll_size_hint", &ll_size_hint, nb::arg("max_tokens"), nb::arg("hidden"),
        nb::arg("num_ranks"), nb::arg("num_experts"),
        "Registered-buffer bytes the LL layout needs (= config.size_hint).");
  m.def(
      "ll_divide",
      [](int32_t d, const std::vector<int32_t>& ns) {
        const LlDivisor v = LlDivisor::make(d);
        std::vector<int32_t> q(ns.size()), r(ns.size());
        for (size_t i = 0; i < ns.size(); ++i) q[i] = v.div(ns[i]), r[i] = v.mod(ns[i]);
        return std::make_pair(q, r);
      },
      nb::arg("divisor"), nb::arg("numerators"),
      "(n / d, n % d) for each n by the kernels' LlDivisor (tests; d >= 1, 0 <= n < 2**31).");
  m.def("ll_grid_blocks", &ll_grid_blocks, nb::arg("sms"), nb::arg("any_port"),
        "Blocks an LL kernel launches with on a GPU of `sms` SMs (tests; ffi/kernels/ll_grid.h).");
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
  m.def("ll_set_peer_failure", &ll_set_peer_failure, nb::arg("buffer_id"), nb::arg("mask"),
        "on_peer_failure='mask' (True) or 'raise' for every device entry of the Buffer.");
  m.def("ll_mask_ranks", &ll_mask_ranks, nb::arg("buffer_id"), nb::arg("ranks"),
        "Adds ranks to the Buffer's mask on this process's devices (synchronises).");
  m.def("ll_unmask_all", &ll_unmask_all, nb::arg("buffer_id"),
        "Clears the mask, its records and the peers' reports (synchronises).");
  m.def("ll_masked_ranks", &ll_masked_ranks, nb::arg("buffer_id"), nb::arg("device"),
        "Masked ranks as this device sees them (synchronises).");
  m.def("ll_mask_events", &ll_mask_events, nb::arg("buffer_id"), nb::arg("device"),
        "[(peer, masked by rank or -1 for the host, phase name)] (synchronises).");
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
