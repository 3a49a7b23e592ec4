// Helpers shared by the CPU kernels: one build per x86-64 level, lane-wise sums that GCC
// vectorises in a fixed order, and a parallel task runner that picks the clone set of a dtype.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
// Built for AVX-512, AVX2 and baseline x86-64; the loader picks one for the running CPU.
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

// One task function per dtype (float32, float16, bfloat16), as built with DFKD_CPU_CLONES.
template <typename Args>
using TaskFunction = void (*)(const Args&, int64_t, int64_t);

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
