// The LL grid: how many blocks an LL kernel launches with, decided once at
// registration (ll_init_state) and kept in the registry entry. Plain constexpr:
// host code (the registry, the bindings' test hook) and device code include it.
#pragma once

namespace jmep {

// The most blocks an LL kernel is launched with (the registry caps the grid):
// each block keeps its own copy of the call's seq (LlDeviceState::seq).
constexpr int kLlMaxBlocks = 256;
// SMs a launch leaves free when a peer is a port peer (ll_grid_blocks says why).
// -DJMEP_LL_PORT_SPARE_SMS=0: the grid covers every SM whatever the peers.
#ifndef JMEP_LL_PORT_SPARE_SMS
#define JMEP_LL_PORT_SPARE_SMS 1
#endif
constexpr int kLlPortSpareSms = JMEP_LL_PORT_SPARE_SMS;

// The LL grid, the one rule: a block per SM, so every block is co-resident
// (they wait on each other), at most kLlMaxBlocks. With a port peer, a port
// signal lands through work the proxy enqueues on this GPU (a one-thread
// kernel per add, over CUDA IPC or for a signal that arrived over UCX; the IPC
// copies too may take SMs). The LL kernels spin waiting for exactly those
// signals, and a block of ours may take a whole SM's registers: leave
// kLlPortSpareSms SMs free so that work always runs. (Without it two processes
// on one GPU time out as soon as every block waits: tokens_beyond_the_grid.)
constexpr int ll_grid_blocks(int sms, bool any_port) {
  const int b = sms < kLlMaxBlocks ? sms : kLlMaxBlocks;
  return !any_port ? b : b > kLlPortSpareSms ? b - kLlPortSpareSms : 1;
}

}  // namespace jmep
