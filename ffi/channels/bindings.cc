// nanobind surface of the channel layer: the Communicator class (held by
// std::shared_ptr so LL buffers can keep it alive) and its bootstrap steps.
// Registered before bind_ll, which casts Python Communicator objects to
// std::shared_ptr<jmep::Communicator>. The channel test and benchmark kernels
// live in the test-only module _ep_testing (ffi/testing/).
#include <cuda_runtime_api.h>
#include <nanobind/nanobind.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings.h"
#include "channels/communicator.h"

namespace nb = nanobind;

namespace jmep {
namespace {

void ck(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

void check_range(const Communicator& c, uint64_t off, uint64_t n) {
  if (c.closed()) throw std::runtime_error("Communicator is closed");
  if (off > c.buffer_bytes() || n > c.buffer_bytes() - off)
    throw std::out_of_range("range outside the registered buffer");
}

// Synchronous copies between Python bytes and the registered buffer.
void write_bytes(Communicator& c, uint64_t off, nb::bytes data) {
  check_range(c, off, data.size());
  int saved = 0;
  cudaGetDevice(&saved);
  cudaSetDevice(c.device());
  cudaError_t e = cudaMemcpy(c.buffer() + off, data.c_str(), data.size(), cudaMemcpyHostToDevice);
  cudaSetDevice(saved);
  ck(e, "write");
}

nb::bytes read_bytes(Communicator& c, uint64_t off, uint64_t n) {
  check_range(c, off, n);
  std::string out(n, '\0');
  int saved = 0;
  cudaGetDevice(&saved);
  cudaSetDevice(c.device());
  cudaError_t e = cudaMemcpy(out.data(), c.buffer() + off, n, cudaMemcpyDeviceToHost);
  cudaSetDevice(saved);
  ck(e, "read");
  return nb::bytes(out.data(), out.size());
}

// Waits for the launches on the communicator's own stream (tests, close).
void sync_stream(Communicator& c) {
  int saved = 0;
  cudaGetDevice(&saved);
  cudaSetDevice(c.device());
  cudaError_t e = cudaStreamSynchronize(c.stream());
  cudaSetDevice(saved);
  ck(e, "stream sync");
}

}  // namespace

void bind_channels(nb::module_& m) {
  m.def("device_count", []() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return n;
  });
  m.def("mem_get_info", [](int device) {
    size_t free_b = 0, total_b = 0;
    int saved = 0;
    cudaGetDevice(&saved);
    ck(cudaSetDevice(device), "cudaSetDevice");
    cudaError_t e = cudaMemGetInfo(&free_b, &total_b);
    cudaSetDevice(saved);
    ck(e, "cudaMemGetInfo");
    return std::vector<uint64_t>{free_b, total_b};
  }, nb::arg("device"), "[free, total] bytes of a GPU (leak checks)");
  nb::class_<Communicator>(m, "Communicator")
      .def(nb::new_([](int rank, int nranks, int device, size_t buffer_bytes, bool force_port,
                       int64_t timeout_ns, int fifo_size, const std::string& host_id) {
             return std::make_shared<Communicator>(rank, nranks, device, buffer_bytes, force_port,
                                                   timeout_ns, fifo_size, host_id);
           }),
           nb::arg("rank"), nb::arg("nranks"), nb::arg("device"), nb::arg("buffer_bytes"),
           nb::arg("force_port") = false, nb::arg("timeout_ns") = 30000000000LL,
           nb::arg("fifo_size") = 1024, nb::arg("host_id") = "")
      .def("enable_ucx",
           [](Communicator& c, const std::string& lib_path, int signal_mode) {
             nb::gil_scoped_release r;
             c.enable_ucx(lib_path, signal_mode);
           },
           nb::arg("lib_path"), nb::arg("signal_mode") = 1,
           "register the buffer with UCX (peers on other hosts); before local_info()")
      .def_prop_ro("ucx_enabled", &Communicator::ucx_enabled)
      .def("proxy_stats", &Communicator::proxy_stats,
           "[cuda-ipc triggers, ns, ucx triggers, ns] performed by the proxy (pop to posted)")
      .def_prop_ro("host_id", &Communicator::host_id)
      .def("describe_peer", &Communicator::describe_peer, nb::arg("peer"),
           "how the proxy reaches the peer: self, memory, cuda-ipc, or ucx + its transports")
      .def("local_info",
           [](Communicator& c) {
             std::string s = c.local_info();
             return nb::bytes(s.data(), s.size());
           })
      .def("connect",
           [](Communicator& c, std::vector<nb::bytes> infos) {
             std::vector<std::string> v;
             for (auto& b : infos) v.emplace_back(b.c_str(), b.size());
             nb::gil_scoped_release r;
             c.connect(v);
           })
      .def("close", [](Communicator& c) {
        nb::gil_scoped_release r;
        c.close();
      })
      .def("check_error", &Communicator::check_error)
      .def_prop_ro("rank", &Communicator::rank)
      .def_prop_ro("nranks", &Communicator::nranks)
      .def_prop_ro("device", &Communicator::device)
      .def_prop_ro("buffer_bytes", &Communicator::buffer_bytes)
      .def_prop_ro("buffer_ptr",
                   [](const Communicator& c) { return reinterpret_cast<uintptr_t>(c.buffer()); })
      .def_prop_ro("timeout_ns", &Communicator::timeout_ns)
      .def_prop_ro("connected", &Communicator::connected)
      .def_prop_ro("closed", &Communicator::closed)
      .def("channel_kind", &Communicator::channel_kind, nb::arg("peer"),
           "0 self, 1 memory (NVLink), 2 port (proxy)")
      .def_prop_ro("channel_kinds",
                   [](const Communicator& c) {
                     std::vector<int> k;
                     for (int p = 0; p < c.nranks(); ++p) k.push_back(c.channel_kind(p));
                     return k;
                   })
      .def("write", &write_bytes, nb::arg("offset"), nb::arg("data"))
      .def("read", &read_bytes, nb::arg("offset"), nb::arg("nbytes"))
      .def("sync", [](Communicator& c) {
        {
          nb::gil_scoped_release r;
          sync_stream(c);
        }
        c.check_error();
      });
}

}  // namespace jmep
