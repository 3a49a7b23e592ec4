// Counter-based normal random numbers shared by the C++ (CPU) and CUDA kernels.
//
// Philox4x32-10 (Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3", SC'11) maps a
// 128-bit counter and a 64-bit key to four 32-bit words; Box-Muller turns each pair of words into
// two standard normals, with the log, sqrt and sin/cos of float_math.h.
//
// This header includes no torch and no CUDA library headers.
#pragma once

#include <cstdint>

#include "float_math.h"

namespace dfkd_fast {
namespace philox {

using math::log_positive;
using math::sincos_turns;
using math::sqrt_f32;

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

// Uniform in (0, 1]: word * 2^-32 + 2^-33, never 0, so its logarithm is finite.
DFKD_HOST_DEVICE float uniform_open_at_zero(uint32_t word) {
  return static_cast<float>(word) * 2.3283064365386963e-10f + 1.1641532182693481e-10f;
}

// Uniform in [0, 1] (the rounding of word * 2^-32 may reach 1, a full turn).
DFKD_HOST_DEVICE float uniform_closed(uint32_t word) {
  return static_cast<float>(word) * 2.3283064365386963e-10f;
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
