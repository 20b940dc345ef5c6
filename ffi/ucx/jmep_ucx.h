/* The UCX connection of the port-channel proxy, as a C API.
 *
 * It lives in its own shared library (libjmep_ucx.so, linked against libucp)
 * so that the main module never needs UCX: the proxy dlopens it only when a
 * peer sits on another host, and tests drive it through ctypes on host memory.
 *
 * One jmep_ucx is one rank's UCP context + worker, one registered memory
 * region (base, bytes; host or CUDA memory) and an endpoint per remote peer.
 * Offsets are byte offsets into the region (the src offset into ours, the dst
 * offset into the peer's), as in the channel layer.
 *
 * Ordering (what the kernels rely on): data put to a peer before an add or a
 * store to that peer is visible in the peer's memory before the add/store is.
 * The library makes it so by holding each signal (add/store) back until a flush
 * of the endpoint, started after the data, has completed remotely; signals
 * that follow no new data go at once. Puts among themselves, and signals
 * among themselves, are not ordered (none of the users needs it).
 *
 * Signals travel in one of two ways (signal_mode):
 *  - JMEP_UCX_SIGNALS_RMA: ucp_atomic_op_nbx (add) and an 8-byte
 *    ucp_put_nbx (store) on the peer's memory. Adds need a transport with
 *    remote atomics on that memory type (InfiniBand/RoCE; device memory with
 *    GPUDirect RDMA). TCP has none (UCX 1.22 with peer error handling): there
 *    the first add fails with a clear error; stores work anywhere.
 *  - JMEP_UCX_SIGNALS_AM: an active message that the peer's worker applies
 *    when it progresses: through its apply callback (the GPU proxy enqueues a
 *    one-thread kernel behind its own copies) or, without one, as a host atomic
 *    on host memory. Works on every transport (TCP cannot do atomics on GPU
 *    memory), and an add stays exact since only the owner applies it.
 *
 * Every call returns 0 on success and -1 on error (jmep_ucx_last_error says
 * what; errors are sticky). Blocking calls (flush, back-pressure on too many
 * outstanding requests) give up after timeout_ns. Calls are serialised by an
 * internal mutex, so several threads may share one handle.
 */
#ifndef JMEP_UCX_H_
#define JMEP_UCX_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct jmep_ucx jmep_ucx;

enum { JMEP_UCX_MEM_HOST = 0, JMEP_UCX_MEM_CUDA = 1 };
enum { JMEP_UCX_SIGNALS_RMA = 0, JMEP_UCX_SIGNALS_AM = 1 };
enum { JMEP_UCX_OP_ADD = 1, JMEP_UCX_OP_STORE = 2 };

/* Applies a signal that arrived as an active message: *(base + offset) += value
 * (op ADD, value is the signed delta's bits) or = value (op STORE). Called from
 * inside jmep_ucx_progress, on the progressing thread. */
typedef void (*jmep_ucx_apply_fn)(void* ctx, int op, uint64_t offset, uint64_t value);

/* Library version string ("jmep_ucx <ours> / UCX <major.minor.patch>"). */
const char* jmep_ucx_version(void);

/* NULL on failure, with the reason in err (err_len bytes, may be 0). */
jmep_ucx* jmep_ucx_create(int rank, int nranks, void* base, uint64_t bytes, int mem_type,
                          int signal_mode, int64_t timeout_ns, jmep_ucx_apply_fn apply,
                          void* apply_ctx, char* err, uint64_t err_len);

/* This rank's blob for its peers (worker address, packed rkey, region). Returns
 * its length; if cap is too small, writes nothing and returns -length. */
int64_t jmep_ucx_address(jmep_ucx* u, void* out, uint64_t cap);

/* Endpoint to `peer` from that peer's blob (non-blocking: wire-up completes
 * as both workers progress). */
int jmep_ucx_connect(jmep_ucx* u, int peer, const void* blob, uint64_t len);

int jmep_ucx_put(jmep_ucx* u, int peer, uint64_t dst_off, uint64_t src_off, uint64_t bytes);
int jmep_ucx_add(jmep_ucx* u, int peer, uint64_t dst_off, int64_t delta);
int jmep_ucx_store(jmep_ucx* u, int peer, uint64_t dst_off, uint64_t value);

/* Returns once every operation posted to `peer` (-1: all peers) before the call,
 * held-back signals included, has completed at the target. */
int jmep_ucx_flush(jmep_ucx* u, int peer);

/* Drives the worker: completions, held-back signals, incoming active messages
 * and (for software transports like TCP) the peers' puts into our memory.
 * Returns the number of events progressed, or -1 after an error. */
int jmep_ucx_progress(jmep_ucx* u);

/* Requests posted and not yet complete (puts, signals, held-back signals). */
int64_t jmep_ucx_outstanding(jmep_ucx* u);

/* The first error ("" if none) and the peer it concerns (-1: none / not peer-specific). */
const char* jmep_ucx_last_error(jmep_ucx* u);
int jmep_ucx_failed_peer(jmep_ucx* u);

/* Peer isolation (off by default): a peer's endpoint error, failed request or
 * flush timeout loses only that peer. Calls towards it then fail, the others go
 * on, progress stays >= 0, last_error / failed_peer name the first peer lost.
 * Off: the first error of any kind fails every later call (the worker is done). */
int jmep_ucx_set_peer_isolation(jmep_ucx* u, int on);

/* Transports the endpoint to `peer` uses (ucp_ep_print_info), into out. Returns
 * the length written (truncated to cap - 1), or -1. */
int64_t jmep_ucx_describe(jmep_ucx* u, int peer, char* out, uint64_t cap);

/* Closes endpoints (forcibly: a dead peer never blocks it), unmaps the region,
 * destroys the worker and context. Bounded by a few seconds. */
void jmep_ucx_destroy(jmep_ucx* u);

#ifdef __cplusplus
}
#endif

#endif /* JMEP_UCX_H_ */
