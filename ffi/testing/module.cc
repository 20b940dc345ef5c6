// _ep_testing: the channel layer's test and benchmark kernels, as a module of
// its own that the package never imports (tests/_channels_worker.py,
// benchmarks/bench_channels.py, benchmarks/bench_hosts.py and tests/test_native.py
// do). Its functions take a Communicator made by _ep: nanobind shares bound
// types between modules built with the same nanobind ABI, and the kernels only
// use the Communicator's inline accessors and device handles, so no code of
// _ep is linked in twice.
#include <cuda_runtime_api.h>
#include <nanobind/nanobind.h>
#include <nanobind/stl/vector.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "channels/communicator.h"
#include "testing/channel_tests.h"

namespace nb = nanobind;
using jmep::Communicator;

namespace {

// [errors, elapsed_ns] that the test kernels left in the communicator's
// scratch words; resets them by default.
std::vector<uint64_t> read_scratch(Communicator& c, bool reset) {
  if (c.closed()) throw std::runtime_error("Communicator is closed");
  std::vector<uint64_t> v(2);
  int saved = 0;
  cudaGetDevice(&saved);
  cudaSetDevice(c.device());
  cudaError_t e = cudaMemcpy(v.data(), c.scratch(), 16, cudaMemcpyDeviceToHost);
  if (e == cudaSuccess && reset) e = cudaMemset(c.scratch(), 0, 16);
  cudaSetDevice(saved);
  if (e != cudaSuccess) throw std::runtime_error(std::string("scratch: ") + cudaGetErrorString(e));
  return v;
}

}  // namespace

NB_MODULE(_ep_testing, m) {
  m.doc() = "jax_mscclpp_ep channel-layer test and benchmark kernels (tests only)";
  m.def("scratch", &read_scratch, nb::arg("comm"), nb::arg("reset") = true,
        "[errors, elapsed_ns] of the last test launch(es); resets them by default");
  m.def("test_put", &jmep::test_put, nb::arg("comm"), nb::arg("peer"), nb::arg("dst_off"),
        nb::arg("src_off"), nb::arg("nbytes"), nb::arg("signal") = true, nb::arg("blocks") = 32,
        nb::arg("threads") = 512, nb::arg("iters") = 1);
  m.def("test_signal", &jmep::test_signal, nb::arg("comm"), nb::arg("peer"));
  m.def("test_wait", &jmep::test_wait, nb::arg("comm"), nb::arg("peer"));
  m.def("test_flush", &jmep::test_flush, nb::arg("comm"), nb::arg("peer"));
  m.def("test_pingpong", &jmep::test_pingpong, nb::arg("comm"), nb::arg("peer"), nb::arg("rounds"),
        nb::arg("initiator"), nb::arg("payload") = 0, nb::arg("src_off") = 0,
        nb::arg("dst_off") = 65536, nb::arg("check") = false, nb::arg("threads") = 128);
  m.def("test_atomic", &jmep::test_atomic, nb::arg("comm"), nb::arg("peer"), nb::arg("dst_off"),
        nb::arg("blocks"), nb::arg("threads"), nb::arg("per_thread"));
  m.def("test_barrier", &jmep::test_barrier, nb::arg("comm"), nb::arg("iters") = 1);
  m.def(
      "bench_put",
      [](Communicator& c, int peer, uint64_t n, int iters, int blocks, int threads) {
        nb::gil_scoped_release r;
        return jmep::bench_put(c, peer, n, iters, blocks, threads);
      },
      nb::arg("comm"), nb::arg("peer"), nb::arg("nbytes"), nb::arg("iters") = 20,
      nb::arg("blocks") = 32, nb::arg("threads") = 512);
  m.def(
      "bench_peer_copy",
      [](Communicator& c, int peer, uint64_t n, int iters) {
        nb::gil_scoped_release r;
        return jmep::bench_peer_copy(c, peer, n, iters);
      },
      nb::arg("comm"), nb::arg("peer"), nb::arg("nbytes"), nb::arg("iters") = 20);
}
