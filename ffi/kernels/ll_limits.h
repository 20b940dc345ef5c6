// The LL kernels' limits, defined once: shared-memory arrays in the kernels are
// sized by them, the registry and the FFI handlers check against them, and
// _ep.ll_limits() exports them under the names jax_mscclpp_ep/config.py uses
// for its trace-time checks (tests/test_native.py checks that the two agree).
// Plain constexpr ints: host and device code both include this.
#pragma once

namespace jmep {

constexpr int kLlFp8Block = 128;        // config.FP8_BLOCK: channels per fp8 scale
constexpr int kLlMaxTopk = 16;          // config.MAX_TOPK
constexpr int kLlMaxExperts = 1024;     // config.MAX_EXPERTS
constexpr int kLlMaxTokens = 1024;      // config.MAX_TOKENS_PER_RANK
constexpr int kLlMaxRanks = 64;         // config.MAX_RANKS
constexpr int kLlMaxHidden = 8192;      // config.GPU_MAX_HIDDEN (512 threads x 16 channels)
constexpr int kLlHiddenMultiple = kLlFp8Block;  // config.GPU_HIDDEN_MULTIPLE: whole scale blocks

// (name in config.py, value) for _ep.ll_limits(); one row per limit above.
struct LlLimit {
  const char* name;
  int value;
};
constexpr LlLimit kLlLimits[] = {
    {"MAX_TOPK", kLlMaxTopk},           {"MAX_EXPERTS", kLlMaxExperts},
    {"MAX_TOKENS_PER_RANK", kLlMaxTokens}, {"MAX_RANKS", kLlMaxRanks},
    {"GPU_MAX_HIDDEN", kLlMaxHidden},   {"GPU_HIDDEN_MULTIPLE", kLlHiddenMultiple},
    {"FP8_BLOCK", kLlFp8Block},
};

}  // namespace jmep
