// UCX connection of the proxy: see ucx_connection.h.
#include "channels/ucx_connection.h"

#include <dlfcn.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>

#include "ucx/jmep_ucx.h"

namespace jmep {

struct UcxApi {
  decltype(&jmep_ucx_version) version;
  decltype(&jmep_ucx_create) create;
  decltype(&jmep_ucx_address) address;
  decltype(&jmep_ucx_connect) connect;
  decltype(&jmep_ucx_put) put;
  decltype(&jmep_ucx_add) add;
  decltype(&jmep_ucx_store) store;
  decltype(&jmep_ucx_flush) flush;
  decltype(&jmep_ucx_progress) progress;
  decltype(&jmep_ucx_last_error) last_error;
  decltype(&jmep_ucx_failed_peer) failed_peer;
  decltype(&jmep_ucx_set_peer_isolation) set_peer_isolation;
  decltype(&jmep_ucx_describe) describe;
  decltype(&jmep_ucx_destroy) destroy;
};

namespace {

// dlopen once per path; the handle is never closed (UCX keeps threads/state).
const UcxApi* load_api(const std::string& path) {
  static std::mutex mu;
  static std::map<std::string, UcxApi> loaded;
  std::lock_guard<std::mutex> lock(mu);
  auto it = loaded.find(path);
  if (it != loaded.end()) return &it->second;
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (h == nullptr)
    throw std::runtime_error(std::string("jax_mscclpp_ep: cannot load the UCX connection library ") +
                             path + ": " + dlerror() +
                             " (install jax_mscclpp_ep[ucx], or a system UCX on the loader path)");
  UcxApi a;
  auto sym = [&](const char* name) {
    void* f = dlsym(h, name);
    if (f == nullptr)
      throw std::runtime_error(std::string("jax_mscclpp_ep: ") + path + " lacks " + name);
    return f;
  };
  // Each entry point by its name: a.put = jmep_ucx_put, ...
#define JMEP_UCX_SYM(f) a.f = reinterpret_cast<decltype(a.f)>(sym("jmep_ucx_" #f))
  JMEP_UCX_SYM(version);
  JMEP_UCX_SYM(create);
  JMEP_UCX_SYM(address);
  JMEP_UCX_SYM(connect);
  JMEP_UCX_SYM(put);
  JMEP_UCX_SYM(add);
  JMEP_UCX_SYM(store);
  JMEP_UCX_SYM(flush);
  JMEP_UCX_SYM(progress);
  JMEP_UCX_SYM(last_error);
  JMEP_UCX_SYM(failed_peer);
  JMEP_UCX_SYM(set_peer_isolation);
  JMEP_UCX_SYM(describe);
  JMEP_UCX_SYM(destroy);
#undef JMEP_UCX_SYM
  return &(loaded[path] = a);
}

}  // namespace

int ucx_signal_mode_from_env() {
  const char* v = std::getenv("JMEP_UCX_SIGNALS");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "am") == 0) return JMEP_UCX_SIGNALS_AM;
  if (std::strcmp(v, "rma") == 0) return JMEP_UCX_SIGNALS_RMA;
  throw std::invalid_argument(std::string("JMEP_UCX_SIGNALS must be 'am' or 'rma', got '") + v + "'");
}

UcxWorker::UcxWorker(const std::string& lib_path, int rank, int nranks, char* base,
                     uint64_t bytes, int signal_mode, int64_t timeout_ns, ProxyStream* ps)
    : api_(load_api(lib_path)), base_(base), signal_mode_(signal_mode), ps_(ps) {
  char err[512] = {0};
  u_ = api_->create(rank, nranks, base, bytes, JMEP_UCX_MEM_CUDA, signal_mode, timeout_ns,
                    &UcxWorker::apply, this, err, sizeof(err));
  if (u_ == nullptr)
    throw std::runtime_error(std::string("jax_mscclpp_ep: UCX setup failed: ") + err);
}

UcxWorker::~UcxWorker() {
  if (u_ != nullptr) api_->destroy(u_);
}

// A signal that arrived as an active message, on the proxy thread (inside
// progress): enqueued on the proxy stream, behind nothing the peer needs but
// after the bytes UCX already completed into our buffer.
void UcxWorker::apply(void* ctx, int op, uint64_t offset, uint64_t value) {
  UcxWorker* w = static_cast<UcxWorker*>(ctx);
  uint64_t* word = reinterpret_cast<uint64_t*>(w->base_ + offset);
  cudaError_t e = op == JMEP_UCX_OP_ADD ? w->ps_->add(word, static_cast<int64_t>(value))
                                        : w->ps_->store_max(word, value);
  if (e != cudaSuccess) w->apply_failed_ = true;
}

std::string UcxWorker::address() const {
  const int64_t n = -api_->address(u_, nullptr, 0);
  std::string out(static_cast<size_t>(n), '\0');
  if (api_->address(u_, out.data(), out.size()) != n)
    throw std::runtime_error("jax_mscclpp_ep: UCX address changed size");
  return out;
}

void UcxWorker::connect(int peer, const std::string& blob) {
  if (api_->connect(u_, peer, blob.data(), blob.size()) != 0)
    throw std::runtime_error(std::string("jax_mscclpp_ep: UCX connect: ") + api_->last_error(u_));
}

int UcxWorker::progress() { return apply_failed_ ? -1 : api_->progress(u_); }

std::string UcxWorker::error() const {
  std::string e = api_->last_error(u_);
  if (e.empty() && apply_failed_) e = "a signal received over UCX could not be applied on the GPU";
  return e;
}

int UcxWorker::failed_peer() const { return api_->failed_peer(u_); }

void UcxWorker::set_peer_isolation(bool on) {
  api_->set_peer_isolation(u_, on ? 1 : 0);
  isolated_.store(on, std::memory_order_release);
}

std::string UcxWorker::describe(int peer) const {
  std::string out(16384, '\0');
  const int64_t n = api_->describe(u_, peer, out.data(), out.size());
  out.resize(n > 0 ? static_cast<size_t>(n) : 0);
  return out;
}

bool UcxConnection::put(uint64_t dst_off, uint64_t src_off, uint64_t bytes) {
  return w_->api().put(w_->handle(), peer_, dst_off, src_off, bytes) == 0;
}

bool UcxConnection::signal(uint64_t sem_off, uint64_t value) {
  return w_->api().store(w_->handle(), peer_, sem_off, value) == 0;
}

bool UcxConnection::atomic_add(uint64_t dst_off, int64_t delta) {
  return w_->api().add(w_->handle(), peer_, dst_off, delta) == 0;
}

bool UcxConnection::flush() { return w_->api().flush(w_->handle(), peer_) == 0; }

}  // namespace jmep
