// Per-128-channel e4m3 cast, bit-exact with reference.fp8_cast:
// amax = max(|x|, 1e-4); scale_inv = amax / 448 (IEEE division);
// q = rne_e4m3(x * (448 / amax)); with round_scale, scale_inv is rounded up
// to a power of two by bit arithmetic and q = x * (1 / scale_inv).
// No fast-math: __fdiv_rn / __fmul_rn keep every rounding explicit.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cstdint>

namespace jmep {

// Smallest power of two >= s (s positive, normal), exactly.
__device__ __forceinline__ float ll_pow2_ceil(float s) {
  uint32_t bits = __float_as_uint(s);
  uint32_t exp = bits & 0x7F800000u;
  if (bits & 0x007FFFFFu) exp += 0x00800000u;
  return __uint_as_float(exp);
}

// (multiplier, scale_inv) for a block whose max |x| is amax_raw.
__device__ __forceinline__ void ll_fp8_scale(float amax_raw, bool round_scale, float* mul,
                                             float* scale_inv) {
  const float amax = fmaxf(amax_raw, 1e-4f);
  if (round_scale) {
    const float s = ll_pow2_ceil(__fdiv_rn(amax, 448.0f));
    *scale_inv = s;
    *mul = __fdiv_rn(1.0f, s);
  } else {
    *scale_inv = __fdiv_rn(amax, 448.0f);
    *mul = __fdiv_rn(448.0f, amax);
  }
}

// 16 bf16 channels (two uint4) -> floats.
__device__ __forceinline__ void ll_bf16x16_to_float(const uint4& a, const uint4& b, float* f) {
  const __nv_bfloat162* pa = reinterpret_cast<const __nv_bfloat162*>(&a);
  const __nv_bfloat162* pb = reinterpret_cast<const __nv_bfloat162*>(&b);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 u = __bfloat1622float2(pa[i]);
    float2 v = __bfloat1622float2(pb[i]);
    f[2 * i] = u.x;
    f[2 * i + 1] = u.y;
    f[8 + 2 * i] = v.x;
    f[8 + 2 * i + 1] = v.y;
  }
}

// 16 floats * mul -> 16 e4m3 bytes (round to nearest even, saturating).
__device__ __forceinline__ uint4 ll_float16_to_e4m3(const float* f, float mul) {
  uint4 out;
  uint16_t* p = reinterpret_cast<uint16_t*>(&out);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    float2 v = make_float2(__fmul_rn(f[2 * i], mul), __fmul_rn(f[2 * i + 1], mul));
    p[i] = static_cast<uint16_t>(__nv_cvt_float2_to_fp8x2(v, __NV_SATFINITE, __NV_E4M3));
  }
  return out;
}

}  // namespace jmep
