// The UCX connection (see jmep_ucx.h): one UCP worker per rank, one
// registered region, an endpoint per remote peer, and signals held back until
// the data before them has completed remotely.
#include "ucx/jmep_ucx.h"

#include <ucp/api/ucp.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

namespace {

constexpr uint32_t kBlobMagic = 0x4a555831;  // "JUX1"
constexpr unsigned kAmSignalId = 17;         // our only active message
constexpr int64_t kMaxOutstanding = 2048;    // requests in flight before posting waits

struct BlobHeader {
  uint32_t magic;
  int32_t rank;
  int32_t nranks;
  int32_t mem_type;
  uint64_t base;
  uint64_t bytes;
  uint64_t addr_len;
  uint64_t rkey_len;
};

struct AmSignal {
  uint32_t op;
  uint32_t pad;
  uint64_t offset;
  uint64_t value;
};

struct Signal {
  int op;
  uint64_t offset;
  uint64_t value;
};

enum OpKind { kOpPut = 0, kOpSignal = 1, kOpFlush = 2 };

struct Peer {
  jmep_ucx* owner = nullptr;
  int index = -1;
  ucp_ep_h ep = nullptr;
  ucp_rkey_h rkey = nullptr;
  uint64_t base = 0, bytes = 0;
  // Held-back signals (see the header): `dirty` = data posted since the last
  // flush began; `waiting` need the flush in flight, `later` a flush not yet
  // started (they follow data posted while one was in flight).
  bool dirty = false;
  bool flushing = false;
  bool flush_done = false;
  std::vector<Signal> waiting, later;
  // Peer isolation (jmep_ucx_set_peer_isolation): its endpoint or a request
  // failed, or it stopped completing; calls towards it fail, the others go on.
  bool lost = false;
  int64_t outstanding = 0;  // its requests in flight (a lost peer's may never complete)
};

// Lives until its request completes (operand words, active-message header).
struct Op {
  jmep_ucx* owner;
  int peer;
  int kind;
  uint64_t word;
  AmSignal am;
};

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

struct jmep_ucx {
  int rank = 0, nranks = 0;
  char* base = nullptr;
  uint64_t bytes = 0;
  int mem_type = JMEP_UCX_MEM_HOST;
  int signal_mode = JMEP_UCX_SIGNALS_RMA;
  int64_t timeout_ns = 0;
  jmep_ucx_apply_fn apply = nullptr;
  void* apply_ctx = nullptr;

  ucp_context_h ctx = nullptr;
  ucp_worker_h worker = nullptr;
  ucp_mem_h memh = nullptr;
  void* rkey_buf = nullptr;
  size_t rkey_len = 0;
  ucp_address_t* addr = nullptr;
  size_t addr_len = 0;

  std::vector<Peer> peers;
  int64_t outstanding = 0;
  int64_t held = 0;
  bool closing = false;
  std::string error;       // the worker failed: every call fails
  std::string lost_error;  // peer isolation: the first peer lost (the worker is fine)
  bool isolate = false;
  int failed_peer = -1;
  std::recursive_mutex mu;
};

namespace {

int fail(jmep_ucx* u, int peer, const std::string& what) {
  if (u->error.empty()) {
    u->error = "jmep_ucx rank " + std::to_string(u->rank) + ": " + what;
    u->failed_peer = peer;
  }
  return -1;
}

int fail_status(jmep_ucx* u, int peer, const char* what, ucs_status_t st) {
  return fail(u, peer,
              std::string(what) + (peer >= 0 ? " (peer " + std::to_string(peer) + ")" : "") +
                  ": " + ucs_status_string(st));
}

// A failure that concerns one peer: with peer isolation only that peer is lost,
// else (the default) the whole worker fails, as any error does.
int lose(jmep_ucx* u, int peer, const std::string& what) {
  if (!u->isolate || peer < 0 || peer >= u->nranks) return fail(u, peer, what);
  Peer& p = u->peers[peer];
  if (u->lost_error.empty()) u->lost_error = "jmep_ucx rank " + std::to_string(u->rank) + ": " + what;
  if (u->failed_peer < 0) u->failed_peer = peer;
  p.lost = true;
  return -1;
}

int lose_status(jmep_ucx* u, int peer, const char* what, ucs_status_t st) {
  return lose(u, peer, std::string(what) + " (peer " + std::to_string(peer) + "): " +
                           ucs_status_string(st));
}

// Requests in flight that can still complete (not a lost peer's).
int64_t live_outstanding(const jmep_ucx* u) {
  int64_t n = u->outstanding;
  for (const Peer& p : u->peers)
    if (p.lost) n -= p.outstanding;
  return n;
}

ucs_memory_type_t ucs_mem(int mem_type) {
  return mem_type == JMEP_UCX_MEM_CUDA ? UCS_MEMORY_TYPE_CUDA : UCS_MEMORY_TYPE_HOST;
}

const char* op_name(const jmep_ucx* u, const Op* op) {
  if (op->kind == kOpFlush) return "flush";
  if (op->kind == kOpPut) return "put";
  if (u->signal_mode == JMEP_UCX_SIGNALS_RMA && op->am.op == JMEP_UCX_OP_ADD)
    return "remote atomic add (the transport may have no atomics on this memory, e.g. TCP: "
           "use signals by active message)";
  return "signal";
}

void on_done(void* request, ucs_status_t status, void* user_data) {
  Op* op = static_cast<Op*>(user_data);
  jmep_ucx* u = op->owner;
  --u->outstanding;
  if (op->peer >= 0 && op->peer < u->nranks) --u->peers[op->peer].outstanding;
  if (status != UCS_OK && !(u->closing && status == UCS_ERR_CANCELED))
    lose_status(u, op->peer, op_name(u, op), status);
  if (op->kind == kOpFlush) u->peers[op->peer].flush_done = true;
  delete op;
  ucp_request_free(request);
}

void on_ep_error(void* arg, ucp_ep_h, ucs_status_t status) {
  Peer* p = static_cast<Peer*>(arg);
  if (!p->owner->closing) lose_status(p->owner, p->index, "endpoint error", status);
}

ucs_status_t on_am(void* arg, const void* header, size_t header_length, void*, size_t,
                   const ucp_am_recv_param_t*) {
  jmep_ucx* u = static_cast<jmep_ucx*>(arg);
  if (header_length != sizeof(AmSignal)) return UCS_OK;
  AmSignal s;
  std::memcpy(&s, header, sizeof(s));
  if (s.offset % 8 != 0 || s.offset + 8 > u->bytes) {
    fail(u, -1, "signal for offset " + std::to_string(s.offset) + " outside the region");
    return UCS_OK;
  }
  if (u->apply != nullptr) {
    u->apply(u->apply_ctx, static_cast<int>(s.op), s.offset, s.value);
  } else {
    uint64_t* w = reinterpret_cast<uint64_t*>(u->base + s.offset);
    if (s.op == JMEP_UCX_OP_ADD) __atomic_fetch_add(w, s.value, __ATOMIC_SEQ_CST);
    else __atomic_store_n(w, s.value, __ATOMIC_RELEASE);
  }
  return UCS_OK;
}

// Common tail of every post: immediate completion, error, or one more in flight.
int finish(jmep_ucx* u, ucs_status_ptr_t p, Op* op) {
  if (p == nullptr) {  // completed in place
    if (op->kind == kOpFlush) u->peers[op->peer].flush_done = true;
    delete op;
    return 0;
  }
  if (UCS_PTR_IS_ERR(p)) {
    const int peer = op->peer;
    const std::string name = op_name(u, op);
    delete op;
    return lose_status(u, peer, name.c_str(), UCS_PTR_STATUS(p));
  }
  ++u->outstanding;
  if (op->peer >= 0 && op->peer < u->nranks) ++u->peers[op->peer].outstanding;
  return 0;
}

ucp_request_param_t params_for(Op* op) {
  ucp_request_param_t prm;
  std::memset(&prm, 0, sizeof(prm));
  prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  prm.cb.send = on_done;
  prm.user_data = op;
  return prm;
}

int progress_locked(jmep_ucx* u);

// Back-pressure: too many requests in flight waits (bounded), never drops.
int make_room(jmep_ucx* u) {
  if (live_outstanding(u) < kMaxOutstanding) return 0;
  const int64_t start = now_ns();
  while (live_outstanding(u) >= kMaxOutstanding) {
    if (progress_locked(u) < 0) return -1;
    if (u->timeout_ns > 0 && now_ns() - start > u->timeout_ns)
      return fail(u, -1, "timed out with " + std::to_string(u->outstanding) +
                             " requests outstanding (a peer stopped progressing?)");
  }
  return 0;
}

int check_peer(jmep_ucx* u, int peer) {
  if (!u->error.empty()) return -1;
  if (peer < 0 || peer >= u->nranks || u->peers[peer].ep == nullptr)
    return fail(u, peer, "no endpoint to peer " + std::to_string(peer));
  return u->peers[peer].lost ? -1 : 0;
}

int send_signal(jmep_ucx* u, int peer, const Signal& s) {
  Peer& p = u->peers[peer];
  Op* op = new Op{u, peer, kOpSignal, s.value, AmSignal{static_cast<uint32_t>(s.op), 0, s.offset, s.value}};
  ucp_request_param_t prm = params_for(op);
  ucs_status_ptr_t r;
  if (u->signal_mode == JMEP_UCX_SIGNALS_AM) {
    prm.op_attr_mask |= UCP_OP_ATTR_FIELD_FLAGS;
    prm.flags = UCP_AM_SEND_FLAG_COPY_HEADER | UCP_AM_SEND_FLAG_EAGER;
    r = ucp_am_send_nbx(p.ep, kAmSignalId, &op->am, sizeof(AmSignal), nullptr, 0, &prm);
  } else if (s.op == JMEP_UCX_OP_ADD) {
    prm.op_attr_mask |= UCP_OP_ATTR_FIELD_DATATYPE | UCP_OP_ATTR_FIELD_MEMORY_TYPE;
    prm.datatype = ucp_dt_make_contig(8);
    prm.memory_type = UCS_MEMORY_TYPE_HOST;
    r = ucp_atomic_op_nbx(p.ep, UCP_ATOMIC_OP_ADD, &op->word, 1, p.base + s.offset, p.rkey, &prm);
  } else {
    prm.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMORY_TYPE;
    prm.memory_type = UCS_MEMORY_TYPE_HOST;
    r = ucp_put_nbx(p.ep, &op->word, 8, p.base + s.offset, p.rkey, &prm);
  }
  return finish(u, r, op);
}

int start_flush(jmep_ucx* u, int peer) {
  Peer& p = u->peers[peer];
  p.dirty = false;
  p.flushing = true;
  p.flush_done = false;
  Op* op = new Op{u, peer, kOpFlush, 0, AmSignal{}};
  ucp_request_param_t prm = params_for(op);
  return finish(u, ucp_ep_flush_nbx(p.ep, &prm), op);
}

// A flush finished: its signals go; the next batch gets a flush of its own.
int after_flush(jmep_ucx* u, int peer) {
  Peer& p = u->peers[peer];
  p.flushing = p.flush_done = false;
  std::vector<Signal> go;
  go.swap(p.waiting);
  u->held -= static_cast<int64_t>(go.size());
  if (!p.later.empty()) {
    if (p.dirty) {
      p.waiting.swap(p.later);
      if (start_flush(u, peer) < 0) return -1;
    } else {
      go.insert(go.end(), p.later.begin(), p.later.end());
      u->held -= static_cast<int64_t>(p.later.size());
      p.later.clear();
    }
  }
  for (const Signal& s : go)
    if (send_signal(u, peer, s) < 0) return -1;
  return 0;
}

int progress_locked(jmep_ucx* u) {
  int n = static_cast<int>(ucp_worker_progress(u->worker));
  for (int q = 0; q < u->nranks; ++q) {
    Peer& p = u->peers[q];
    if (p.lost) {  // its held-back signals can never go
      u->held -= static_cast<int64_t>(p.waiting.size() + p.later.size());
      p.waiting.clear();
      p.later.clear();
      p.flushing = p.flush_done = false;
      continue;
    }
    if (p.flush_done) {
      ++n;
      if (after_flush(u, q) < 0) return -1;
    }
  }
  return u->error.empty() ? n : -1;
}

int signal(jmep_ucx* u, int peer, int op, uint64_t off, uint64_t value) {
  std::lock_guard<std::recursive_mutex> lock(u->mu);
  if (check_peer(u, peer) < 0) return -1;
  Peer& p = u->peers[peer];
  if (off % 8 != 0 || off + 8 > p.bytes)
    return fail(u, peer, "signal offset " + std::to_string(off) + " outside the peer's region");
  if (make_room(u) < 0) return -1;
  const Signal s{op, off, value};
  if (!p.flushing && !p.dirty) return send_signal(u, peer, s);
  ++u->held;
  if (p.flushing && p.dirty) {
    p.later.push_back(s);
    return 0;
  }
  p.waiting.push_back(s);
  return p.flushing ? 0 : start_flush(u, peer);
}

void destroy_locked(jmep_ucx* u) {
  u->closing = true;
  std::vector<void*> closing;
  for (Peer& p : u->peers) {
    if (p.rkey) ucp_rkey_destroy(p.rkey);
    p.rkey = nullptr;
    if (p.ep == nullptr) continue;
    ucp_request_param_t prm;
    std::memset(&prm, 0, sizeof(prm));
    prm.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    prm.flags = UCP_EP_CLOSE_FLAG_FORCE;  // a dead peer must not block the close
    ucs_status_ptr_t r = ucp_ep_close_nbx(p.ep, &prm);
    if (r != nullptr && !UCS_PTR_IS_ERR(r)) closing.push_back(r);
    p.ep = nullptr;
  }
  const int64_t deadline = now_ns() + 3000000000LL;
  for (void* r : closing) {
    while (ucp_request_check_status(r) == UCS_INPROGRESS && now_ns() < deadline)
      ucp_worker_progress(u->worker);
    ucp_request_free(r);
  }
  // Cancelled requests report here, while `u` is still alive.
  for (int i = 0; i < 100 && u->worker && ucp_worker_progress(u->worker) > 0; ++i) {
  }
  if (u->rkey_buf) ucp_rkey_buffer_release(u->rkey_buf);
  if (u->addr) ucp_worker_release_address(u->worker, u->addr);
  if (u->memh) ucp_mem_unmap(u->ctx, u->memh);
  if (u->worker) ucp_worker_destroy(u->worker);
  if (u->ctx) ucp_cleanup(u->ctx);
  u->rkey_buf = nullptr;
  u->addr = nullptr;
  u->memh = nullptr;
  u->worker = nullptr;
  u->ctx = nullptr;
}

void set_err(char* err, uint64_t len, const std::string& msg) {
  if (err == nullptr || len == 0) return;
  std::snprintf(err, len, "%s", msg.c_str());
}

}  // namespace

extern "C" {

const char* jmep_ucx_version(void) {
  static std::string v = std::string("jmep_ucx 1 / UCX ") + ucp_get_version_string();
  return v.c_str();
}

jmep_ucx* jmep_ucx_create(int rank, int nranks, void* base, uint64_t bytes, int mem_type,
                          int signal_mode, int64_t timeout_ns, jmep_ucx_apply_fn apply,
                          void* apply_ctx, char* err, uint64_t err_len) {
  if (nranks <= 0 || rank < 0 || rank >= nranks || base == nullptr || bytes == 0 ||
      (mem_type != JMEP_UCX_MEM_HOST && mem_type != JMEP_UCX_MEM_CUDA) ||
      (signal_mode != JMEP_UCX_SIGNALS_RMA && signal_mode != JMEP_UCX_SIGNALS_AM)) {
    set_err(err, err_len, "jmep_ucx_create: bad arguments");
    return nullptr;
  }
  if (mem_type == JMEP_UCX_MEM_CUDA && signal_mode == JMEP_UCX_SIGNALS_AM && apply == nullptr) {
    set_err(err, err_len, "jmep_ucx_create: signals by active message on CUDA memory need an apply callback");
    return nullptr;
  }
  jmep_ucx* u = new jmep_ucx;
  u->rank = rank;
  u->nranks = nranks;
  u->base = static_cast<char*>(base);
  u->bytes = bytes;
  u->mem_type = mem_type;
  u->signal_mode = signal_mode;
  u->timeout_ns = timeout_ns;
  u->apply = apply;
  u->apply_ctx = apply_ctx;
  u->peers.resize(nranks);
  for (int p = 0; p < nranks; ++p) u->peers[p].owner = u, u->peers[p].index = p;
  std::string what;
  ucs_status_t st = UCS_OK;
  do {
    ucp_config_t* cfg = nullptr;
    if ((st = ucp_config_read(nullptr, nullptr, &cfg)) != UCS_OK) { what = "ucp_config_read"; break; }
    ucp_params_t prm;
    std::memset(&prm, 0, sizeof(prm));
    prm.field_mask = UCP_PARAM_FIELD_FEATURES;
    prm.features = UCP_FEATURE_RMA | UCP_FEATURE_AM |
                   (signal_mode == JMEP_UCX_SIGNALS_RMA ? UCP_FEATURE_AMO64 : 0);
    st = ucp_init(&prm, cfg, &u->ctx);
    ucp_config_release(cfg);
    if (st != UCS_OK) { what = "ucp_init"; break; }
    ucp_worker_params_t wp;
    std::memset(&wp, 0, sizeof(wp));
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_SINGLE;  // our mutex serialises every call
    if ((st = ucp_worker_create(u->ctx, &wp, &u->worker)) != UCS_OK) { what = "ucp_worker_create"; break; }
    ucp_mem_map_params_t mp;
    std::memset(&mp, 0, sizeof(mp));
    mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH |
                    UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE;
    mp.address = base;
    mp.length = bytes;
    mp.memory_type = ucs_mem(mem_type);
    if ((st = ucp_mem_map(u->ctx, &mp, &u->memh)) != UCS_OK) { what = "ucp_mem_map"; break; }
    if ((st = ucp_rkey_pack(u->ctx, u->memh, &u->rkey_buf, &u->rkey_len)) != UCS_OK) { what = "ucp_rkey_pack"; break; }
    if ((st = ucp_worker_get_address(u->worker, &u->addr, &u->addr_len)) != UCS_OK) { what = "ucp_worker_get_address"; break; }
    ucp_am_handler_param_t hp;
    std::memset(&hp, 0, sizeof(hp));
    hp.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                    UCP_AM_HANDLER_PARAM_FIELD_ARG;
    hp.id = kAmSignalId;
    hp.cb = on_am;
    hp.arg = u;
    if ((st = ucp_worker_set_am_recv_handler(u->worker, &hp)) != UCS_OK) { what = "ucp_worker_set_am_recv_handler"; break; }
  } while (false);
  if (st != UCS_OK) {
    set_err(err, err_len, std::string("jmep_ucx_create: ") + what + ": " + ucs_status_string(st));
    destroy_locked(u);
    delete u;
    return nullptr;
  }
  return u;
}

int64_t jmep_ucx_address(jmep_ucx* u, void* out, uint64_t cap) {
  std::lock_guard<std::recursive_mutex> lock(u->mu);
  const uint64_t n = sizeof(BlobHeader) + u->addr_len + u->rkey_len;
  if (out == nullptr || cap < n) return -static_cast<int64_t>(n);
  BlobHeader h{kBlobMagic, u->rank, u->nranks, u->mem_type, reinterpret_cast<uint64_t>(u->base),
               u->bytes, u->addr_len, u->rkey_len};
  char* o = static_cast<char*>(out);
  std::memcpy(o, &h, sizeof(h));
  std::memcpy(o + sizeof(h), u->addr, u->addr_len);
  std::memcpy(o + sizeof(h) + u->addr_len, u->rkey_buf, u->rkey_len);
  return static_cast<int64_t>(n);
}

int jmep_ucx_connect(jmep_ucx* u, int peer, const void* blob, uint64_t len) {
  std::lock_guard<std::recursive_mutex> lock(u->mu);
  if (!u->error.empty()) return -1;
  if (peer < 0 || peer >= u->nranks || peer == u->rank)
    return fail(u, peer, "connect: bad peer " + std::to_string(peer));
  BlobHeader h;
  if (blob == nullptr || len < sizeof(h)) return fail(u, peer, "connect: blob too short");
  std::memcpy(&h, blob, sizeof(h));
  if (h.magic != kBlobMagic || h.rank != peer || h.nranks != u->nranks ||
      len != sizeof(h) + h.addr_len + h.rkey_len)
    return fail(u, peer, "connect: the blob is not peer " + std::to_string(peer) + "'s (or is corrupt)");
  Peer& p = u->peers[peer];
  if (p.ep != nullptr) return fail(u, peer, "connect: already connected");
  const char* b = static_cast<const char*>(blob);
  ucp_ep_params_t ep;
  std::memset(&ep, 0, sizeof(ep));
  ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                  UCP_EP_PARAM_FIELD_ERR_HANDLER;
  ep.address = reinterpret_cast<const ucp_address_t*>(b + sizeof(h));
  ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;  // a dead peer is reported, not waited for
  ep.err_handler.cb = on_ep_error;
  ep.err_handler.arg = &p;
  ucs_status_t st = ucp_ep_create(u->worker, &ep, &p.ep);
  if (st != UCS_OK) {
    p.ep = nullptr;
    return fail_status(u, peer, "ucp_ep_create", st);
  }
  st = ucp_ep_rkey_unpack(p.ep, b + sizeof(h) + h.addr_len, &p.rkey);
  if (st != UCS_OK) return fail_status(u, peer, "ucp_ep_rkey_unpack", st);
  p.base = h.base;
  p.bytes = h.bytes;
  return 0;
}

int jmep_ucx_put(jmep_ucx* u, int peer, uint64_t dst_off, uint64_t src_off, uint64_t bytes) {
  std::lock_guard<std::recursive_mutex> lock(u->mu);
  if (check_peer(u, peer) < 0) return -1;
  Peer& p = u->peers[peer];
  if (src_off > u->bytes || bytes > u->bytes - src_off || dst_off > p.bytes ||
      bytes > p.bytes - dst_off)
    return fail(u, peer, "put outside the registered regions (dst " + std::to_string(dst_off) +
                             ", src " + std::to_string(src_off) + ", " + std::to_string(bytes) + " B)");
  if (bytes == 0) return 0;
  if (make_room(u) < 0) return -1;
  Op* op = new Op{u, peer, kOpPut, 0, AmSignal{}};
  ucp_request_param_t prm = params_for(op);
  prm.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMORY_TYPE | UCP_OP_ATTR_FIELD_MEMH;
  prm.memory_type = ucs_mem(u->mem_type);
  prm.memh = u->memh;
  p.dirty = true;
  return finish(u, ucp_put_nbx(p.ep, u->base + src_off, bytes, p.base + dst_off, p.rkey, &prm),
                op);
}

int jmep_ucx_add(jmep_ucx* u, int peer, uint64_t dst_off, int64_t delta) {
  return signal(u, peer, JMEP_UCX_OP_ADD, dst_off, static_cast<uint64_t>(delta));
}

int jmep_ucx_store(jmep_ucx* u, int peer, uint64_t dst_off, uint64_t value) {
  return signal(u, peer, JMEP_UCX_OP_STORE, dst_off, value);
}

int jmep_ucx_flush(jmep_ucx* u, int peer) {
  std::lock_guard<std::recursive_mutex> lock(u->mu);
  if (!u->error.empty()) return -1;
  if (peer != -1 && check_peer(u, peer) < 0) return -1;
  const int64_t start = now_ns();
  auto expired = [&] { return u->timeout_ns > 0 && now_ns() - start > u->timeout_ns; };
  // 1. Every held-back signal is sent (their flushes complete as we progress).
  while (u->held > 0) {
    if (progress_locked(u) < 0) return -1;
    if (expired()) return lose(u, peer, "flush timed out waiting for the peer to complete earlier data");
  }
  // 2. Everything posted (signals included) completes at the target.
  for (int q = 0; q < u->nranks; ++q) {
    if ((peer != -1 && q != peer) || u->peers[q].ep == nullptr) continue;
    Peer& p = u->peers[q];
    if (p.lost) return -1;  // what was posted to it can no longer complete
    while (p.flushing) {
      if (progress_locked(u) < 0) return -1;
      if (expired()) return lose(u, q, "flush timed out (peer " + std::to_string(q) + ")");
    }
    if (start_flush(u, q) < 0) return -1;
    while (p.flushing && !p.flush_done) {
      if (progress_locked(u) < 0) return -1;
      if (expired()) return lose(u, q, "flush timed out (peer " + std::to_string(q) + ")");
    }
    if (p.flush_done && after_flush(u, q) < 0) return -1;
  }
  return u->error.empty() ? 0 : -1;
}

int jmep_ucx_progress(jmep_ucx* u) {
  std::lock_guard<std::recursive_mutex> lock(u->mu);
  if (!u->error.empty()) return -1;
  return progress_locked(u);
}

int64_t jmep_ucx_outstanding(jmep_ucx* u) {
  std::lock_guard<std::recursive_mutex> lock(u->mu);
  return u->outstanding + u->held;
}

const char* jmep_ucx_last_error(jmep_ucx* u) {
  std::lock_guard<std::recursive_mutex> lock(u->mu);
  return u->error.empty() ? u->lost_error.c_str() : u->error.c_str();
}

int jmep_ucx_set_peer_isolation(jmep_ucx* u, int on) {
  std::lock_guard<std::recursive_mutex> lock(u->mu);
  u->isolate = on != 0;
  return 0;
}

int jmep_ucx_failed_peer(jmep_ucx* u) {
  std::lock_guard<std::recursive_mutex> lock(u->mu);
  return u->failed_peer;
}

int64_t jmep_ucx_describe(jmep_ucx* u, int peer, char* out, uint64_t cap) {
  std::lock_guard<std::recursive_mutex> lock(u->mu);
  if (peer < 0 || peer >= u->nranks || u->peers[peer].ep == nullptr || out == nullptr || cap == 0)
    return -1;
  char* text = nullptr;
  size_t n = 0;
  FILE* f = open_memstream(&text, &n);
  if (f == nullptr) return -1;
  ucp_ep_print_info(u->peers[peer].ep, f);
  std::fclose(f);
  const uint64_t m = n < cap - 1 ? n : cap - 1;
  std::memcpy(out, text, m);
  out[m] = '\0';
  std::free(text);
  return static_cast<int64_t>(m);
}

void jmep_ucx_destroy(jmep_ucx* u) {
  if (u == nullptr) return;
  {
    std::lock_guard<std::recursive_mutex> lock(u->mu);
    destroy_locked(u);
  }
  delete u;
}

}  // extern "C"
