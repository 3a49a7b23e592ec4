// Counter-based normal random numbers shared by the C++ (CPU) and CUDA kernels.
//
// Philox4x32-10 (Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3", SC'11) maps a
// 128-bit counter and a 64-bit key to four 32-bit words; Box-Muller turns each pair of words into
// two standard normals. The float math below (log, exp, sin/cos of an angle in turns) is written
// out with plain arithmetic and selects so that the CPU loop auto-vectorises and so that CPU and
// CUDA evaluate the same expressions. Polynomial coefficients are Taylor coefficients; the
// truncation error of each is stated beside it.
//
// This header includes no torch and no CUDA library headers.
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
namespace philox {

constexpr uint32_t kMultiplier0 = 0xD2511F53u;
constexpr uint32_t kMultiplier1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kWeyl1 = 0xBB67AE85u;  // sqrt(3) - 1
constexpr int kRounds = 10;

struct Words {
  uint32_t w0, w1, w2, w3;
};

DFKD_HOST_DEVICE uint32_t mul_hi_lo(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t product = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
#endif
}

// Philox4x32 with 10 rounds: the key is bumped by the Weyl constants between rounds.
DFKD_HOST_DEVICE Words philox4x32_10(Words counter, uint32_t key0, uint32_t key1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kRounds; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mul_hi_lo(kMultiplier0, counter.w0, &hi0);
    const uint32_t lo1 = mul_hi_lo(kMultiplier1, counter.w2, &hi1);
    counter = Words{hi1 ^ counter.w1 ^ key0, lo1, hi0 ^ counter.w3 ^ key1, lo0};
    key0 += kWeyl0;
    key1 += kWeyl1;
  }
  return counter;
}

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

// Uniform in (0, 1]: word * 2^-32 + 2^-33, never 0, so its logarithm is finite.
DFKD_HOST_DEVICE float uniform_open_at_zero(uint32_t word) {
  return static_cast<float>(word) * 2.3283064365386963e-10f + 1.1641532182693481e-10f;
}

// Uniform in [0, 1] (the rounding of word * 2^-32 may reach 1, a full turn).
DFKD_HOST_DEVICE float uniform_closed(uint32_t word) {
  return static_cast<float>(word) * 2.3283064365386963e-10f;
}

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

// Box-Muller: two 32-bit words to two independent standard normals.
DFKD_HOST_DEVICE void box_muller(uint32_t radius_word, uint32_t angle_word, float* first,
                                 float* second) {
  const float radius = sqrt_f32(-2.0f * log_positive(uniform_open_at_zero(radius_word)));
  float sin_angle, cos_angle;
  sincos_turns(uniform_closed(angle_word), &sin_angle, &cos_angle);
  *first = radius * cos_angle;
  *second = radius * sin_angle;
}

// Four standard normals from one Philox block: (w0, w1) and (w2, w3) are Box-Muller pairs.
DFKD_HOST_DEVICE void normals4(Words counter, uint64_t key, float out[4]) {
  const Words words =
      philox4x32_10(counter, static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
  box_muller(words.w0, words.w1, &out[0], &out[1]);
  box_muller(words.w2, words.w3, &out[2], &out[3]);
}

}  // namespace philox
}  // namespace dfkd_fast
