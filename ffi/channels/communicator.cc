// Communicator: registered memory, peer mapping, channel handles, proxy.
#include "channels/communicator.h"

#include <unistd.h>

#include <cstring>
#include <fstream>
#include <stdexcept>

#include "channels/channel_handles_host.h"
#include "channels/connection.h"
#include "channels/error_text.h"
#include "channels/ipc_connection.h"
#include "channels/proxy.h"
#include "channels/proxy_stream.h"
#include "channels/ucx_connection.h"

namespace jmep {
namespace {

void ck(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("jax_mscclpp_ep channels: ") + what + ": " +
                             cudaGetErrorString(e));
}

struct DeviceGuard {
  int saved = -1;
  explicit DeviceGuard(int dev) {
    ck(cudaGetDevice(&saved), "cudaGetDevice");
    ck(cudaSetDevice(dev), "cudaSetDevice");
  }
  ~DeviceGuard() {
    if (saved >= 0) cudaSetDevice(saved);
  }
};

// What a peer needs to reach this rank, sent as bytes: this fixed part, then
// ucx_len bytes of UCX address (worker address, packed rkey) if enabled.
struct PeerInfo {
  uint32_t magic;
  int32_t rank, nranks, pid;
  char host[64];
  char host_id[128];
  char bus_id[32];
  uint64_t buffer_ptr;  // valid in the exporting process only
  uint64_t buffer_bytes;
  uint64_t ucx_len;
  cudaIpcMemHandle_t ipc;
};
constexpr uint32_t kInfoMagic = 0x4a4d4551;

// Default host identity: hostname + boot id (two containers on one machine
// share the boot id but, with their own hostnames, count as two hosts).
std::string default_host_id() {
  char host[64] = {0};
  gethostname(host, sizeof(host) - 1);
  std::string boot;
  std::ifstream f("/proc/sys/kernel/random/boot_id");
  std::getline(f, boot);
  return std::string(host) + "/" + boot;
}

size_t sem_offset(size_t buffer_bytes) { return (buffer_bytes + 255) / 256 * 256; }

}  // namespace

Communicator::Communicator(int rank, int nranks, int device, size_t buffer_bytes, bool force_port,
                           int64_t timeout_ns, int fifo_size, const std::string& host_id)
    : rank_(rank), nranks_(nranks), device_(device), buffer_bytes_(buffer_bytes),
      force_port_(force_port), timeout_ns_(timeout_ns), fifo_size_(fifo_size),
      host_id_(host_id.empty() ? default_host_id() : host_id) {
  if (nranks <= 0 || rank < 0 || rank >= nranks)
    throw std::invalid_argument("Communicator: bad rank/nranks");
  if (fifo_size < 16) throw std::invalid_argument("Communicator: fifo_size must be >= 16");
  if (host_id_.size() >= sizeof(PeerInfo::host_id))
    throw std::invalid_argument("Communicator: host_id longer than 127 bytes");
  DeviceGuard g(device);
  try {
    const size_t total = sem_offset(buffer_bytes) + sem_area_bytes(nranks);
    alloc_bytes_ = total;
    ck(cudaMalloc(reinterpret_cast<void**>(&buffer_), total), "cudaMalloc(registered buffer)");
    ck(cudaMemset(buffer_, 0, total), "cudaMemset(registered buffer)");
    // state: mem expected[n], port expected[n], fifo head, tail cache, poll lock,
    // warm-up words[kWarmupWords], test scratch[kScratchWords]
    const size_t words = 2 * nranks + 3 + kWarmupWords + kScratchWords;
    ck(cudaMalloc(reinterpret_cast<void**>(&state_), words * 8), "cudaMalloc(state)");
    ck(cudaMemset(state_, 0, words * 8), "cudaMemset(state)");
    warmup_ = state_ + 2 * nranks + 3;
    scratch_ = warmup_ + kWarmupWords;
    ck(cudaHostAlloc(reinterpret_cast<void**>(&err_host_), sizeof(ErrorRecord), cudaHostAllocMapped | cudaHostAllocPortable),
       "cudaHostAlloc(error record)");
    std::memset(err_host_, 0, sizeof(ErrorRecord));
    ck(cudaHostGetDevicePointer(reinterpret_cast<void**>(&err_dev_), err_host_, 0),
       "error record device pointer");
    const size_t fifo_bytes = 256 + sizeof(FifoTrigger) * fifo_size;
    ck(cudaHostAlloc(&fifo_host_, fifo_bytes, cudaHostAllocMapped | cudaHostAllocPortable),
       "cudaHostAlloc(fifo)");
    std::memset(fifo_host_, 0, fifo_bytes);
    ck(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    pstream_.reset(new ProxyStream(device));
    ck(cudaDeviceSynchronize(), "communicator setup");
  } catch (...) {
    close();
    throw;
  }
  kinds_.assign(nranks, 2);
  kinds_[rank] = 0;
  peer_bufs_.assign(nranks, nullptr);
  peer_devs_.assign(nranks, -1);
  ipc_opened_.assign(nranks, false);
  peer_bufs_[rank] = buffer_;
  peer_devs_[rank] = device;
}

Communicator::~Communicator() {
  try {
    close();
  } catch (...) {
  }
}

void Communicator::fail_if_closed() const {
  if (closed_) throw std::runtime_error("Communicator is closed");
}

void Communicator::set_ucx_peer_isolation(bool on) {
  if (ucx_) ucx_->set_peer_isolation(on);
}

void Communicator::enable_ucx(const std::string& lib_path, int signal_mode) {
  fail_if_closed();
  if (connected_) throw std::runtime_error("enable_ucx: already connected");
  if (ucx_) return;
  DeviceGuard g(device_);
  ucx_.reset(new UcxWorker(lib_path, rank_, nranks_, buffer_, alloc_bytes_, signal_mode,
                           timeout_ns_, pstream_.get()));
}

std::string Communicator::describe_peer(int peer) const {
  if (peer < 0 || peer >= nranks_) throw std::out_of_range("describe_peer: bad peer");
  if (peer == rank_) return "self";
  if (kinds_[peer] == 1) return "memory";
  if (static_cast<size_t>(peer) < conns_.size() && conns_[peer] &&
      std::string(conns_[peer]->kind()) == "ucx")
    return "ucx\n" + ucx_->describe(peer);
  return "cuda-ipc";
}

std::string Communicator::local_info() const {
  fail_if_closed();
  PeerInfo info;
  std::memset(&info, 0, sizeof(info));
  info.magic = kInfoMagic;
  info.rank = rank_;
  info.nranks = nranks_;
  info.pid = static_cast<int32_t>(getpid());
  gethostname(info.host, sizeof(info.host) - 1);
  std::memcpy(info.host_id, host_id_.data(), host_id_.size());
  const std::string ucx = ucx_ ? ucx_->address() : std::string();
  info.ucx_len = ucx.size();
  ck(cudaDeviceGetPCIBusId(info.bus_id, sizeof(info.bus_id), device_), "cudaDeviceGetPCIBusId");
  info.buffer_ptr = reinterpret_cast<uint64_t>(buffer_);
  info.buffer_bytes = buffer_bytes_;
  {
    DeviceGuard g(device_);
    ck(cudaIpcGetMemHandle(&info.ipc, buffer_), "cudaIpcGetMemHandle");
  }
  return std::string(reinterpret_cast<const char*>(&info), sizeof(info)) + ucx;
}

void Communicator::connect(const std::vector<std::string>& infos) {
  fail_if_closed();
  if (connected_) throw std::runtime_error("Communicator already connected");
  if (static_cast<int>(infos.size()) != nranks_)
    throw std::invalid_argument("connect: need one info per rank");
  DeviceGuard g(device_);
  const int my_pid = static_cast<int>(getpid());
  const size_t soff = sem_offset(buffer_bytes_);
  std::vector<ProxyPeer> proxy_peers(nranks_);
  conns_.clear();
  conns_.resize(nranks_);
  for (int p = 0; p < nranks_; ++p) {
    PeerInfo info;
    if (infos[p].size() < sizeof(PeerInfo))
      throw std::invalid_argument("connect: malformed info for rank " + std::to_string(p));
    std::memcpy(&info, infos[p].data(), sizeof(info));
    if (info.magic != kInfoMagic || info.rank != p || info.nranks != nranks_ ||
        info.buffer_bytes != buffer_bytes_ || infos[p].size() != sizeof(PeerInfo) + info.ucx_len)
      throw std::invalid_argument("connect: info of rank " + std::to_string(p) +
                                  " does not match (rank/nranks/buffer size; mixed versions?)");
    if (p == rank_) continue;
    proxy_peers[p].sem_off = soff + (static_cast<size_t>(nranks_) + rank_) * 8;
    info.host_id[sizeof(info.host_id) - 1] = '\0';
    if (host_id_ != info.host_id) {
      // Another host: a UCX port channel (the LL kernels stage into our buffer).
      if (!ucx_)
        throw std::runtime_error(
            "connect: rank " + std::to_string(p) + " is on another host ('" + info.host_id +
            "', this rank is on '" + host_id_ + "'): reaching it needs the UCX connection, "
            "which was not enabled on this rank");
      if (info.ucx_len == 0)
        throw std::runtime_error("connect: rank " + std::to_string(p) + " (host '" +
                                 info.host_id + "') offers no UCX address");
      ucx_->connect(p, infos[p].substr(sizeof(PeerInfo)));
      kinds_[p] = 2;
      conns_[p].reset(new UcxConnection(ucx_.get(), p));
      proxy_peers[p].conn = conns_[p].get();
      continue;
    }
    int pdev = -1;
    ck(cudaDeviceGetByPCIBusId(&pdev, info.bus_id), "cudaDeviceGetByPCIBusId (peer GPU not visible?)");
    peer_devs_[p] = pdev;
    // Two ranks may share one GPU (a loopback that lets one GPU stand in for a
    // pair in tests): the peer's buffer is then plain local device memory.
    int can = 1;
    if (pdev != device_) ck(cudaDeviceCanAccessPeer(&can, device_, pdev), "cudaDeviceCanAccessPeer");
    if (can && pdev != device_) {
      cudaError_t e = cudaDeviceEnablePeerAccess(pdev, 0);
      if (e == cudaErrorPeerAccessAlreadyEnabled) cudaGetLastError();
      else ck(e, "cudaDeviceEnablePeerAccess");
    }
    if (info.pid == my_pid) {
      peer_bufs_[p] = reinterpret_cast<char*>(info.buffer_ptr);  // same process: raw pointer
    } else {
      void* ptr = nullptr;
      ck(cudaIpcOpenMemHandle(&ptr, info.ipc, cudaIpcMemLazyEnablePeerAccess),
         "cudaIpcOpenMemHandle");
      peer_bufs_[p] = static_cast<char*>(ptr);
      ipc_opened_[p] = true;
    }
    kinds_[p] = (can && !force_port_) ? 1 : 2;
    conns_[p].reset(new IpcConnection(pstream_.get(), buffer_, peer_bufs_[p]));
    proxy_peers[p].conn = conns_[p].get();
  }

  HandleInputs in;
  in.rank = rank_;
  in.nranks = nranks_;
  in.local = buffer_;
  in.sem_off = soff;
  in.peer_bufs = peer_bufs_;
  in.kinds = kinds_;
  in.state = state_;
  in.fifo_host = fifo_host_;
  in.fifo_size = static_cast<uint32_t>(fifo_size_);
  in.err_dev = err_dev_;
  in.timeout_ns = timeout_ns_;
  handles_dev_ = build_device_handles(in);

  char* fifo = static_cast<char*>(fifo_host_);
  proxy_.reset(new Proxy(pstream_.get(), reinterpret_cast<FifoTrigger*>(fifo + 256),
                         reinterpret_cast<uint64_t*>(fifo), static_cast<uint32_t>(fifo_size_),
                         std::move(proxy_peers), ucx_.get(), err_host_, rank_));
  connected_ = true;
}

void Communicator::close() {
  if (closed_) return;
  closed_ = true;
  int saved = -1;
  cudaGetDevice(&saved);
  cudaSetDevice(device_);
  if (stream_) cudaStreamSynchronize(stream_);
  proxy_.reset();  // stops the thread after draining its stream
  // UCX before the memory it registered (endpoints closed forcibly: a dead
  // peer costs nothing), and before the stream its signals are applied on.
  ucx_.reset();
  conns_.clear();
  pstream_.reset();
  for (int p = 0; p < static_cast<int>(ipc_opened_.size()); ++p)
    if (ipc_opened_[p]) cudaIpcCloseMemHandle(peer_bufs_[p]);
  ipc_opened_.assign(ipc_opened_.size(), false);
  if (handles_dev_) cudaFree(handles_dev_);
  if (buffer_) cudaFree(buffer_);
  if (state_) cudaFree(state_);
  if (err_host_) cudaFreeHost(err_host_);
  if (fifo_host_) cudaFreeHost(fifo_host_);
  if (stream_) cudaStreamDestroy(stream_);
  handles_dev_ = nullptr;
  buffer_ = nullptr;
  state_ = warmup_ = scratch_ = nullptr;
  err_host_ = err_dev_ = nullptr;
  fifo_host_ = nullptr;
  stream_ = nullptr;
  cudaGetLastError();
  if (saved >= 0) cudaSetDevice(saved);
}

std::string Communicator::proxy_error() const { return proxy_ ? proxy_->error() : std::string(); }
std::vector<uint64_t> Communicator::proxy_stats() const {
  return proxy_ ? proxy_->stats() : std::vector<uint64_t>(4, 0);
}
bool Communicator::proxy_failed() const { return proxy_ && proxy_->failed(); }

void Communicator::check_error() {
  std::string proxy_err = proxy_ ? proxy_->error() : std::string();
  if (err_host_ == nullptr) {
    if (!proxy_err.empty()) throw std::runtime_error(proxy_err);
    return;
  }
  volatile ErrorRecord* r = err_host_;
  const int32_t code = r->code;
  if (code == kErrOk && proxy_err.empty()) return;
  std::string msg;
  if (code != kErrOk)
    msg = "jax_mscclpp_ep channel error: " + describe_error(snapshot_error(err_host_)) +
          " (timeout " + std::to_string(timeout_ns_ / 1000000) + " ms)";
  if (!proxy_err.empty()) msg += (msg.empty() ? "" : "; ") + proxy_err;
  r->detail = 0;
  r->rank = r->peer = r->phase = 0;
  __atomic_store_n(&err_host_->code, 0, __ATOMIC_RELEASE);
  throw std::runtime_error(msg);
}

}  // namespace jmep
