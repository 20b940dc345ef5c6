// Test/benchmark launches for the channel layer (channel_tests.cu); bound to
// Python by the test-only module _ep_testing (testing/module.cc). Launches are
// asynchronous on the communicator's stream; Communicator.sync() waits.
#pragma once
#include <cstdint>

namespace jmep {

class Communicator;

void test_put(Communicator& c, int peer, uint64_t dst, uint64_t src, uint64_t bytes, bool signal,
              int blocks, int threads, int iters);
void test_signal(Communicator& c, int peer);
void test_wait(Communicator& c, int peer);
void test_flush(Communicator& c, int peer);
void test_pingpong(Communicator& c, int peer, int rounds, bool initiator, uint64_t payload,
                   uint64_t src_off, uint64_t dst_off, bool check, int threads);
void test_atomic(Communicator& c, int peer, uint64_t dst_off, int blocks, int threads,
                 bool per_thread);
void test_barrier(Communicator& c, int iters);
double bench_put(Communicator& c, int peer, uint64_t bytes, int iters, int blocks, int threads);
double bench_peer_copy(Communicator& c, int peer, uint64_t bytes, int iters);

}  // namespace jmep
