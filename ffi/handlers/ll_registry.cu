// Registry of LL state, keyed by (buffer id, device ordinal). The FFI
// handlers look entries up on every call; creation and teardown happen only
// from Python (Buffer creation / close), never inside a jitted step.
#include <cuda_runtime_api.h>

#include <cstddef>
#include <map>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "channels/communicator.h"
#include "channels/error_text.h"
#include "channels/proxy_stream.h"
#include "handlers/ll_entry.cuh"
#include "handlers/ll_registry.h"
#include "kernels/ll_layout.cuh"
#include "kernels/ll_limits.h"

namespace jmep {

int64_t ll_size_hint(int64_t m, int64_t h, int64_t r, int64_t e) {
  return LlLayout::make(m, h, r, e).total_bytes();
}

namespace {

std::mutex g_mu;
std::map<std::pair<int64_t, int>, std::shared_ptr<LlEntry>> g_entries;
std::set<int64_t> g_closed;  // ids of closed Buffers: their calls say so (ll_was_closed)

// Close: wait for our kernels, mark the device state closed (a kernel that an
// executable replays later returns at once: ll_args.cuh), and let go of the
// communicator / peer buffers, which no kernel of this entry touches any more.
void close_entry(LlEntry& e) {
  {
    LlDeviceGuard g(e.device);
    cudaDeviceSynchronize();
    const int32_t closed = 1;
    if (e.st.state != nullptr)
      cudaMemcpy(&e.st.state->closed, &closed, sizeof(closed), cudaMemcpyHostToDevice);
    cudaGetLastError();
  }
  std::lock_guard<std::mutex> lock(e.failure_mu);
  e.host_error = nullptr;
  e.comm.reset();
  e.owned.reset();
}

}  // namespace

LlEntry::~LlEntry() {
  if (dev_mem == nullptr) return;
  int saved = -1;
  if (cudaGetDevice(&saved) != cudaSuccess) return;  // CUDA already torn down (exit)
  cudaSetDevice(device);
  cudaDeviceSynchronize();  // no kernel of ours may still use the state
  cudaFree(dev_mem);
  cudaGetLastError();
  cudaSetDevice(saved);
}

void ll_cuda_check(int err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("jax_mscclpp_ep LL: ") + what + ": " +
                             cudaGetErrorString(static_cast<cudaError_t>(err)));
}

LlDeviceGuard::LlDeviceGuard(int dev) {
  ll_cuda_check(cudaGetDevice(&saved), "cudaGetDevice");
  ll_cuda_check(cudaSetDevice(dev), "cudaSetDevice");
}
LlDeviceGuard::~LlDeviceGuard() { cudaSetDevice(saved); }

void ll_check_sizes(int64_t max_tokens, int64_t hidden, int64_t num_experts, int nranks) {
  const std::string H = std::to_string(kLlHiddenMultiple), MH = std::to_string(kLlMaxHidden);
  if (hidden <= 0 || hidden % kLlHiddenMultiple || hidden > kLlMaxHidden)
    throw std::invalid_argument("LL kernels need hidden to be a multiple of " + H + " and <= " +
                                MH + ", got " + std::to_string(hidden));
  if (nranks <= 0 || nranks > kLlMaxRanks)
    throw std::invalid_argument("LL kernels support 1 to " + std::to_string(kLlMaxRanks) +
                                " ranks");
  if (num_experts <= 0 || num_experts > kLlMaxExperts || num_experts % nranks)
    throw std::invalid_argument("LL kernels need 0 < num_experts <= " +
                                std::to_string(kLlMaxExperts) + ", divisible by the ranks");
  if (max_tokens <= 0 || max_tokens > kLlMaxTokens)
    throw std::invalid_argument("LL kernels need 0 < max_tokens <= " +
                                std::to_string(kLlMaxTokens));
}

void ll_set_peer_table(LlStatic& s, const LlPeer* peers, int nranks) {
  for (int p = 0; p < nranks; ++p) {
    s.peer_base[p] = peers[p].base;
    s.peer_kind[p] = static_cast<int8_t>(peers[p].kind);
  }
}

LlPeer* ll_init_state(LlEntry& e, const LlLayout& layout, char* buffer, int rank, int nranks,
                      int64_t max_tokens, int64_t hidden, int64_t num_experts,
                      ChannelDeviceHandle* handles, ErrorRecord* error, int64_t timeout_ns,
                      const LlPeer* peers_host, bool any_port) {
  int sms = 0;
  ll_cuda_check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, e.device), "SM count");
  int l2 = 0;
  ll_cuda_check(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, e.device), "L2 size");
  ll_cuda_check(ll_preload_dispatch(), "load dispatch kernel");
  ll_cuda_check(ll_preload_combine(), "load combine kernel");
  e.num_blocks = ll_grid_blocks(sms, any_port);
  e.discard_bytes = ll_discard_bytes(l2);
  const size_t state_bytes = sizeof(LlDeviceState) + 2 * sizeof(int32_t) * num_experts;
  const size_t peers_off = (state_bytes + 15) / 16 * 16;
  const size_t bytes = peers_off + sizeof(LlPeer) * nranks;
  ll_cuda_check(cudaMalloc(&e.dev_mem, bytes), "cudaMalloc(LL state)");
  char* base = static_cast<char*>(e.dev_mem);
  ll_cuda_check(cudaMemset(base, 0, bytes), "cudaMemset(LL state)");
  for (int h = 0; h < 2; ++h)  // both halves' signal words start at zero; kernels keep them so
    ll_cuda_check(cudaMemset(buffer + layout.half_base(h) + layout.signal_off, 0,
                             2 * 8 * num_experts),
                  "cudaMemset(signal area)");
  ll_cuda_check(cudaMemset(buffer + layout.mask_off, 0, layout.mask_bytes), "cudaMemset(mask reports)");
  LlPeer* peers = reinterpret_cast<LlPeer*>(base + peers_off);
  LlStatic& s = e.st;
  if (peers_host != nullptr) {
    ll_cuda_check(cudaMemcpy(peers, peers_host, sizeof(LlPeer) * nranks, cudaMemcpyHostToDevice),
                  "copy peer table");
    ll_set_peer_table(s, peers_host, nranks);
  }
  s.layout = layout;
  s.local = buffer;
  s.handles = handles;
  s.state = reinterpret_cast<LlDeviceState*>(base);
  s.slot_ctr = reinterpret_cast<int32_t*>(base + sizeof(LlDeviceState));  // [2][E]
  s.error = error;
  s.timeout_ns = timeout_ns;
  s.rank = rank;
  s.nranks = nranks;
  s.num_experts = static_cast<int32_t>(num_experts);
  s.local_experts = static_cast<int32_t>(num_experts / nranks);
  s.max_tokens = static_cast<int32_t>(max_tokens);
  s.hidden = static_cast<int32_t>(hidden);
  s.div_ranks = LlDivisor::make(s.nranks);
  s.div_local_experts = LlDivisor::make(s.local_experts);
  return peers;
}

void ll_insert(int64_t buffer_id, std::shared_ptr<LlEntry> e) {
  std::lock_guard<std::mutex> lock(g_mu);
  g_entries[{buffer_id, e->device}] = std::move(e);  // a replaced entry frees itself
}

std::shared_ptr<LlEntry> ll_find(int64_t buffer_id, int device) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_entries.find({buffer_id, device});
  if (it != g_entries.end()) return it->second;
  // One GPU per process: XLA's ordinal may differ from the CUDA ordinal the
  // communicator uses; a buffer with a single local entry is unambiguous.
  std::shared_ptr<LlEntry> only;
  int n = 0;
  for (auto& kv : g_entries)
    if (kv.first.first == buffer_id) only = kv.second, ++n;
  return n == 1 ? only : nullptr;
}

std::vector<std::shared_ptr<LlEntry>> ll_find_all(int64_t buffer_id) {
  std::lock_guard<std::mutex> lock(g_mu);
  std::vector<std::shared_ptr<LlEntry>> out;
  for (auto& kv : g_entries)
    if (kv.first.first == buffer_id) out.push_back(kv.second);
  return out;
}

bool ll_was_closed(int64_t buffer_id) {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_closed.count(buffer_id) != 0;
}

std::string ll_closed_message(int64_t buffer_id) {
  return "jax_mscclpp_ep: Buffer " + std::to_string(buffer_id) +
         " was closed; create a new Buffer (this call was compiled before Buffer.close())";
}

std::string ll_missing_message(int64_t buffer_id, const std::string& where) {
  if (ll_was_closed(buffer_id)) return ll_closed_message(buffer_id);
  return "no LL state for Buffer id " + std::to_string(buffer_id) + where;
}

std::vector<std::shared_ptr<LlEntry>> ll_find_all_or_throw(int64_t buffer_id) {
  auto all = ll_find_all(buffer_id);
  if (all.empty()) throw std::runtime_error(ll_missing_message(buffer_id, ""));
  return all;
}

void ll_register(int64_t buffer_id, std::shared_ptr<Communicator> comm, int64_t max_tokens,
                 int64_t hidden, int64_t num_experts) {
  if (!comm) throw std::invalid_argument("ll_register: communicator is None");
  const int R = comm->nranks();
  ll_check_sizes(max_tokens, hidden, num_experts, R);
  const LlLayout layout = LlLayout::make(max_tokens, hidden, R, num_experts);
  if (static_cast<int64_t>(comm->buffer_bytes()) < layout.total_bytes())
    throw std::invalid_argument("communicator buffer has " + std::to_string(comm->buffer_bytes()) +
                                " bytes, the LL layout needs " +
                                std::to_string(layout.total_bytes()));
  bool any_port = false;
  for (int p = 0; p < R; ++p) any_port |= comm->channel_kind(p) == kLlPort;
  auto e = std::make_shared<LlEntry>();
  e->comm = comm;
  e->device = comm->device();
  LlDeviceGuard g(e->device);
  LlPeer* peers = ll_init_state(*e, layout, comm->buffer(), comm->rank(), R, max_tokens, hidden,
                                num_experts, comm->device_handles(), comm->error_record_device(),
                                comm->timeout_ns(), nullptr, any_port);
  ll_launch_peers_init(comm->device_handles(), comm->buffer(), peers, R, nullptr);
  ll_cuda_check(cudaGetLastError(), "peer table kernel");
  {  // the kernels take the table by value (LlStatic::peer_base)
    std::vector<LlPeer> table(R);
    ll_cuda_check(cudaMemcpy(table.data(), peers, sizeof(LlPeer) * R, cudaMemcpyDeviceToHost),
                  "read peer table");
    ll_set_peer_table(e->st, table.data(), R);
  }
  // With CUDA lazy loading, the first launch of the proxy's one-thread atomic
  // kernel would load its module while an LL kernel spins waiting for that
  // very atomic (a module load can wait for running kernels): load it now.
  if (any_port) {
    uint64_t* w = comm->warmup_words();  // its own words: the test scratch stays the tests'
    ll_cuda_check(proxy_launch_add(w, 0, nullptr), "proxy kernel warm-up");
    ll_cuda_check(proxy_launch_store(w + 1, 0, nullptr), "proxy kernel warm-up");
    ll_cuda_check(proxy_launch_max(w + 2, 0, nullptr), "proxy kernel warm-up");
  }
  ll_cuda_check(cudaDeviceSynchronize(), "LL registration");
  ll_insert(buffer_id, std::move(e));
}

namespace {

const ErrorRecord* host_record(const LlEntry& e) {
  return e.comm ? e.comm->error_record() : e.host_error;
}

}  // namespace

std::string ll_failure(LlEntry& e) {
  std::lock_guard<std::mutex> lock(e.failure_mu);
  if (e.failure.empty()) {
    const ErrorRecord* rec = host_record(e);
    if (rec != nullptr) {
      const ErrorRecord r = snapshot_error(rec);
      // on_peer_failure="mask": the proxy's lost peer is masked by the kernels, not fatal.
      const bool masked_loss = e.st.mask_on_failure && r.code == kErrPeerLost;
      if (r.code != kErrOk && !masked_loss) {
        e.failure = "jax_mscclpp_ep: " + describe_error(r) +
                    ". The results of that call are invalid and this Buffer's state is "
                    "undefined: close it and create a new Buffer (a peer may have died or "
                    "stalled).";
        // The proxy says why it lost the peer (e.g. the UCX endpoint error).
        if (r.code == kErrPeerLost && e.comm && e.comm->proxy_failed())
          e.failure += " Cause: " + e.comm->proxy_error();
      }
    }
  }
  if (e.failure.empty() && !e.st.mask_on_failure && e.comm && e.comm->proxy_failed())
    e.failure = e.comm->proxy_error();
  return e.failure;
}

std::shared_ptr<LlEntry> ll_find_or_throw(int64_t buffer_id, int device) {
  if (auto e = ll_find(buffer_id, device)) return e;
  throw std::runtime_error(ll_missing_message(buffer_id, " on device " + std::to_string(device)));
}

void ll_check(int64_t buffer_id, int device) {
  const std::string f = ll_failure(*ll_find_or_throw(buffer_id, device));
  if (!f.empty()) throw std::runtime_error(f);
}

bool ll_unregister(int64_t buffer_id, int device) {
  std::shared_ptr<LlEntry> e;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_entries.find({buffer_id, device});
    if (it == g_entries.end()) return false;
    e = std::move(it->second);
    g_entries.erase(it);
    g_closed.insert(buffer_id);
  }
  close_entry(*e);
  return true;  // e's device state goes with the last executable that holds it
}

int64_t ll_dropped(int64_t buffer_id, int device) {
  auto e = ll_find(buffer_id, device);
  if (e == nullptr || e->st.state == nullptr) return -1;
  LlDeviceGuard g(e->device);
  LlDeviceState st{};
  ll_cuda_check(cudaMemcpy(&st, e->st.state, sizeof(st), cudaMemcpyDeviceToHost), "read LL state");
  return st.dropped;
}

std::vector<uint64_t> ll_timing(int64_t buffer_id, int device, bool reset) {
  auto e = ll_find_or_throw(buffer_id, device);
  LlDeviceGuard g(e->device);
  ll_cuda_check(cudaDeviceSynchronize(), "sync for timing");
  LlDeviceState st{};
  ll_cuda_check(cudaMemcpy(&st, e->st.state, sizeof(st), cudaMemcpyDeviceToHost), "read LL state");
  if (reset) {
    // The timing words only: mask_by / mask_phase after them are the mask's record.
    const size_t off = offsetof(LlDeviceState, sum_send_ns), end = offsetof(LlDeviceState, mask_by);
    ll_cuda_check(cudaMemset(reinterpret_cast<char*>(e->st.state) + off, 0, end - off),
                  "reset timing");
    ll_cuda_check(cudaDeviceSynchronize(), "reset timing");
  }
  // The newest call's record is folded by the next call; fold it here (as ll_fold_timing).
  for (const LlTimingRecord& r : st.rec)
    if (r.kind == 1 || r.kind == 2) ll_add_timing(st, r, r.kind - 1);
  std::vector<uint64_t> out = {st.calls[0], st.sum_send_ns[0], st.sum_total_ns[0],
                               st.calls[1], st.sum_send_ns[1], st.sum_total_ns[1]};
  for (int k = 0; k < 2; ++k)
    for (int i = 0; i < kLlProbes; ++i) out.push_back(st.sum_probe_ns[k][i]);
  return out;
}

}  // namespace jmep
