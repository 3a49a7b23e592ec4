// Helpers shared by the CPU kernels: one build per x86-64 level, lane-wise sums that GCC
// vectorises in a fixed order, and a parallel task runner that picks the clone set of a dtype.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
// Built for AVX-512, AVX2 and baseline x86-64; the loader picks one for the running CPU.
#define DFKD_HAS_CPU_CLONES 1
#define DFKD_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DFKD_CPU_CLONES
#endif

#if defined(__GNUC__)
// Inlined into each clone, so that the hot loops are compiled for its instruction set.
#define DFKD_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define DFKD_ALWAYS_INLINE inline
#endif

namespace dfkd_fast {
namespace cpu {

// Adds terms[i] to lanes[i % kLanes]: a summation order fixed by the data alone.
template <int kLanes>
DFKD_ALWAYS_INLINE void add_to_lanes(const float* terms, int64_t count, float* lanes) {
  int64_t i = 0;
  for (; i + kLanes <= count; i += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) {
      lanes[lane] += terms[i + lane];
    }
  }
  for (int lane = 0; i < count; ++i, ++lane) {
    lanes[lane] += terms[i];
  }
}

template <int kLanes>
DFKD_ALWAYS_INLINE float sum_lanes(const float* lanes) {
  float total = 0.0f;
  for (int lane = 0; lane < kLanes; ++lane) {
    total += lanes[lane];
  }
  return total;
}

// value as scalar_t, rounded to nearest even. For bfloat16 the same bits as c10's conversion (NaN
// becomes 0x7FC0) without its branch, so that GCC vectorises the loops that store it.
template <typename scalar_t>
DFKD_ALWAYS_INLINE scalar_t rounded(float value) {
  return static_cast<scalar_t>(value);
}

template <>
DFKD_ALWAYS_INLINE c10::BFloat16 rounded<c10::BFloat16>(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  const uint32_t nearest_even = (bits + UINT32_C(0x7FFF) + ((bits >> 16) & 1u)) >> 16;
  const uint16_t stored = value != value ? UINT16_C(0x7FC0) : static_cast<uint16_t>(nearest_even);
  return c10::BFloat16(stored, c10::BFloat16::from_bits());
}

// The clone the loader picks on this CPU, by the checks of GCC's resolver in its order of
// priority. Results can differ between clones in the last bit (only some contract a * b + c).
inline const char* kernel_target() {
#if defined(DFKD_HAS_CPU_CLONES)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) {
    return "x86-64-v4";
  }
  if (__builtin_cpu_supports("x86-64-v3")) {
    return "x86-64-v3";
  }
  return "x86-64";
#else
  return "compiler default";
#endif
}

// Tasks [begin, end) of a kernel, for one dtype.
template <typename Args>
using TaskFunction = void (*)(const Args&, int64_t, int64_t);

// Index of a kernel dtype in the tables DFKD_DTYPE_CLONES builds.
inline int dtype_index(const at::Tensor& tensor, const char* name) {
  switch (tensor.scalar_type()) {
    case at::kFloat:
      return 0;
    case at::kHalf:
      return 1;
    case at::kBFloat16:
      return 2;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, float16 or bfloat16, got ",
                       tensor.scalar_type());
  }
}

// Runs tasks [0, tasks) in parallel with the function of `dtype_index`.
template <typename Args>
void run_tasks(const Args& args, int dtype_index, int64_t tasks, int64_t grain,
               const TaskFunction<Args> (&by_dtype)[3]) {
  const TaskFunction<Args> function = by_dtype[dtype_index];
  at::parallel_for(0, tasks, grain,
                   [&](int64_t begin, int64_t end) { function(args, begin, end); });
}

}  // namespace cpu
}  // namespace dfkd_fast

// Defines `table`, the TaskFunction<Args>[3] of `kernel<T>` for float, Half and BFloat16, each
// compiled with DFKD_CPU_CLONES (so that `kernel`, if DFKD_ALWAYS_INLINE, is built per clone).
#define DFKD_DTYPE_CLONES(table, Args, kernel)                                             \
  DFKD_CPU_CLONES void table##_f32(const Args& a, int64_t begin, int64_t end) {            \
    kernel<float>(a, begin, end);                                                          \
  }                                                                                        \
  DFKD_CPU_CLONES void table##_f16(const Args& a, int64_t begin, int64_t end) {            \
    kernel<c10::Half>(a, begin, end);                                                      \
  }                                                                                        \
  DFKD_CPU_CLONES void table##_bf16(const Args& a, int64_t begin, int64_t end) {           \
    kernel<c10::BFloat16>(a, begin, end);                                                  \
  }                                                                                        \
  const ::dfkd_fast::cpu::TaskFunction<Args> table[3] = {table##_f32, table##_f16, table##_bf16};
