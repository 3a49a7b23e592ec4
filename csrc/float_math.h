// Float32 math written out with plain arithmetic and selects, for host and device.
//
// The CPU loops that call these auto-vectorise (no libm calls, no branches), and CPU and CUDA
// evaluate the same expressions. Each function is a Taylor series after an exact range reduction;
// the truncation error of each is stated beside it. No torch and no CUDA library headers.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DFKD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#include <cmath>
#define DFKD_HOST_DEVICE inline
#endif

namespace dfkd_fast {
namespace math {

DFKD_HOST_DEVICE float bits_to_float(int32_t bits) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
#endif
}

DFKD_HOST_DEVICE int32_t float_to_bits(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(value);
#else
  int32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
#endif
}

DFKD_HOST_DEVICE float sqrt_f32(float x) {
#if defined(__CUDA_ARCH__)
  return sqrtf(x);
#else
  return std::sqrt(x);
#endif
}

// 2^k for an integer k in [-126, 127], built from its exponent bits.
DFKD_HOST_DEVICE float exp2_int(int32_t k) { return bits_to_float((k + 127) << 23); }

// Natural logarithm of a positive, normal float.
// x = 2^e * m with m in [sqrt(1/2), sqrt(2)); log m = 2 atanh(s), s = (m - 1) / (m + 1),
// |s| <= 0.1716. The atanh series is cut after s^9; the first omitted term, 2 s^11 / 11, is below
// 7e-10, far under float rounding.
DFKD_HOST_DEVICE float log_positive(float x) {
  constexpr int32_t kSqrtHalfBits = 0x3F3504F3;  // bits of sqrt(1/2)
  const int32_t bits = float_to_bits(x);
  const int32_t exponent = (bits - kSqrtHalfBits) >> 23;
  const float m = bits_to_float(bits - (exponent << 23));
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  const float series =
      1.0f + s2 * (1.0f / 3.0f + s2 * (1.0f / 5.0f + s2 * (1.0f / 7.0f + s2 * (1.0f / 9.0f))));
  constexpr float kLn2 = 0.6931471805599453f;
  return static_cast<float>(exponent) * kLn2 + 2.0f * s * series;
}

// exp(x) for any float: +inf above ~88.72, 0 below ~-103.97, NaN passes through.
// x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two so that n * kLn2High is exact); the
// Taylor series of e^r is cut after r^7, first omitted term r^8 / 8! < 5.3e-9.
DFKD_HOST_DEVICE float exp_f32(float x) {
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr float kLn2High = 0.693359375f;  // 9 significant bits
  constexpr float kLn2Low = -2.12194440054690583e-4f;
  const bool is_nan = !(x == x);
  float clamped = x < -104.0f ? -104.0f : x;
  clamped = clamped > 89.0f ? 89.0f : clamped;
  clamped = is_nan ? 0.0f : clamped;
  // floor(y + 0.5) by truncation of a positive number: y + 256.5 > 0 for every clamped x.
  const int32_t n = static_cast<int32_t>(clamped * kLog2e + 256.5f) - 256;
  const float nf = static_cast<float>(n);
  const float r = (clamped - nf * kLn2High) - nf * kLn2Low;
  const float poly =
      1.0f +
      r * (1.0f +
           r * (0.5f +
                r * (1.0f / 6.0f +
                     r * (1.0f / 24.0f +
                          r * (1.0f / 120.0f + r * (1.0f / 720.0f + r * (1.0f / 5040.0f)))))));
  // n lies in [-150, 129]; two factors keep each power of two a normal float.
  const int32_t n_half = n / 2;
  const float result = poly * exp2_int(n_half) * exp2_int(n - n_half);
  return is_nan ? x : result;
}

// sin and cos of 2 pi t for t in [0, 1].
// t = q / 4 + f with q = round(4 t) and |f| <= 1/8 (exact in float); x = 2 pi f lies in
// [-pi/4, pi/4]. sin is cut after x^9 (omitted x^11 / 11! < 1.8e-9), cos after x^10
// (omitted x^12 / 12! < 1.2e-10). The quadrant q rotates (cos x, sin x) by q * 90 degrees.
DFKD_HOST_DEVICE void sincos_turns(float t, float* sin_out, float* cos_out) {
  const int32_t quadrant = static_cast<int32_t>(4.0f * t + 0.5f);
  const float f = t - 0.25f * static_cast<float>(quadrant);
  constexpr float kTwoPi = 6.283185307179586f;
  const float x = kTwoPi * f;
  const float x2 = x * x;
  const float sin_x =
      x * (1.0f + x2 * (-1.0f / 6.0f +
                        x2 * (1.0f / 120.0f + x2 * (-1.0f / 5040.0f + x2 * (1.0f / 362880.0f)))));
  const float cos_x =
      1.0f + x2 * (-0.5f + x2 * (1.0f / 24.0f +
                                 x2 * (-1.0f / 720.0f +
                                       x2 * (1.0f / 40320.0f + x2 * (-1.0f / 3628800.0f)))));
  const bool swap = (quadrant & 1) != 0;
  const float sin_abs = swap ? cos_x : sin_x;
  const float cos_abs = swap ? sin_x : cos_x;
  *sin_out = (quadrant & 2) != 0 ? -sin_abs : sin_abs;
  *cos_out = ((quadrant + 1) & 2) != 0 ? -cos_abs : cos_abs;
}

// log(1 + y) for y >= 0 (and y in (-1, 0) when 1 + y is normal), accurate for small y:
// Goldberg's correction log(u) * y / (u - 1) with u = 1 + y rounded.
DFKD_HOST_DEVICE float log1p_f32(float y) {
  const float u = 1.0f + y;
  return u == 1.0f ? y : log_positive(u) * (y / (u - 1.0f));
}

}  // namespace math
}  // namespace dfkd_fast
