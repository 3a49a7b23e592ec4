// CUDA kernels of dfkd_fast::reparameterize and its backward. No torch and no cuRAND headers:
// the torch binding lives in reparameterize_cuda.cpp, and CI compiles this file alone with nvcc.
//
// Tiling: a team of `threads_per_row` threads (a power of two, at most kBlockThreads) covers
// `threads_per_row` Philox groups (4 elements each) of one row; a block holds
// kBlockThreads / threads_per_row teams, one per row. grid.x walks the parts of a row, grid.y the
// row tiles, grid.z slices of the samples. Each thread reads its 4 elements of mu and logvar once
// and writes them for every sample of its slice; the team sums the KL terms of its part in a fixed
// order, so results are deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "../reparameterize_common.h"

namespace dfkd_fast {
namespace reparameterize {
namespace {

constexpr int kBlockThreads = 256;
constexpr int kWarpSize = 32;
constexpr int64_t kMaxGridYZ = 65535;

template <typename T>
struct Io;

template <>
struct Io<float> {
  using Vec4 = float4;
  static __device__ __forceinline__ float load(const float* p) { return *p; }
  static __device__ __forceinline__ void store(float* p, float v) { *p = v; }
  static __device__ __forceinline__ void load4(const float* p, float out[4]) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    out[0] = v.x;
    out[1] = v.y;
    out[2] = v.z;
    out[3] = v.w;
  }
  static __device__ __forceinline__ void store4(float* p, const float v[4]) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  }
};

template <>
struct Io<__half> {
  static __device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
  static __device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
  static __device__ __forceinline__ void load4(const __half* p, float out[4]) {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    const __half2 lo = *reinterpret_cast<const __half2*>(&raw.x);
    const __half2 hi = *reinterpret_cast<const __half2*>(&raw.y);
    out[0] = __low2float(lo);
    out[1] = __high2float(lo);
    out[2] = __low2float(hi);
    out[3] = __high2float(hi);
  }
  static __device__ __forceinline__ void store4(__half* p, const float v[4]) {
    const __half2 lo = __floats2half2_rn(v[0], v[1]);
    const __half2 hi = __floats2half2_rn(v[2], v[3]);
    uint2 raw;
    raw.x = *reinterpret_cast<const uint32_t*>(&lo);
    raw.y = *reinterpret_cast<const uint32_t*>(&hi);
    *reinterpret_cast<uint2*>(p) = raw;
  }
};

template <>
struct Io<__nv_bfloat16> {
  static __device__ __forceinline__ float load(const __nv_bfloat16* p) {
    return __bfloat162float(*p);
  }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, float v) {
    *p = __float2bfloat16_rn(v);
  }
  static __device__ __forceinline__ void load4(const __nv_bfloat16* p, float out[4]) {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    const __nv_bfloat162 lo = *reinterpret_cast<const __nv_bfloat162*>(&raw.x);
    const __nv_bfloat162 hi = *reinterpret_cast<const __nv_bfloat162*>(&raw.y);
    out[0] = __low2float(lo);
    out[1] = __high2float(lo);
    out[2] = __low2float(hi);
    out[3] = __high2float(hi);
  }
  static __device__ __forceinline__ void store4(__nv_bfloat16* p, const float v[4]) {
    const __nv_bfloat162 lo = __floats2bfloat162_rn(v[0], v[1]);
    const __nv_bfloat162 hi = __floats2bfloat162_rn(v[2], v[3]);
    uint2 raw;
    raw.x = *reinterpret_cast<const uint32_t*>(&lo);
    raw.y = *reinterpret_cast<const uint32_t*>(&hi);
    *reinterpret_cast<uint2*>(p) = raw;
  }
};

// Loads the `count` (<= 4) elements at p; with kAligned, count is 4 and p is 4-element aligned.
template <typename T, bool kAligned>
__device__ __forceinline__ void load_group(const T* p, int count, float out[4]) {
  if constexpr (kAligned) {
    Io<T>::load4(p, out);
  } else {
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      out[lane] = lane < count ? Io<T>::load(p + lane) : 0.0f;
    }
  }
}

template <typename T, bool kAligned>
__device__ __forceinline__ void store_group(T* p, int count, const float v[4]) {
  if constexpr (kAligned) {
    Io<T>::store4(p, v);
  } else {
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      if (lane < count) {
        Io<T>::store(p + lane, v[lane]);
      }
    }
  }
}

struct Tiling {
  int threads_per_row;
  int rows_per_block;
  int64_t groups_per_row;
  int64_t parts_per_row;
  int64_t row_tiles;
};

Tiling make_tiling(int64_t rows, int64_t row_size) {
  Tiling t;
  t.groups_per_row = (row_size + kGroupSize - 1) / kGroupSize;
  t.threads_per_row = 1;
  while (t.threads_per_row < kBlockThreads && t.threads_per_row < t.groups_per_row) {
    t.threads_per_row *= 2;
  }
  // Whole warps only (the KL shuffles use full masks): round the rows of a block up to a
  // multiple of the rows one warp holds; rows past the end contribute zeros.
  const int64_t rows_per_warp = std::max(1, kWarpSize / t.threads_per_row);
  const int64_t wanted_rows = (std::max<int64_t>(1, rows) + rows_per_warp - 1) / rows_per_warp;
  t.rows_per_block = static_cast<int>(
      std::min<int64_t>(kBlockThreads / t.threads_per_row, wanted_rows * rows_per_warp));
  t.parts_per_row =
      std::max<int64_t>(1, (t.groups_per_row + t.threads_per_row - 1) / t.threads_per_row);
  t.row_tiles = (rows + t.rows_per_block - 1) / t.rows_per_block;
  return t;
}

// Sum over the threads_per_row threads of one team; every thread of the block must call it.
__device__ __forceinline__ float team_sum(float value, int threads_per_row, float* scratch) {
  const int width = threads_per_row < kWarpSize ? threads_per_row : kWarpSize;
  for (int offset = width / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  if (threads_per_row <= kWarpSize) {
    return value;
  }
  // Teams wider than a warp: one partial per warp in shared memory, summed in warp order.
  const int thread = threadIdx.y * blockDim.x + threadIdx.x;
  const int warp = thread / kWarpSize;
  if (thread % kWarpSize == 0) {
    scratch[warp] = value;
  }
  __syncthreads();
  const int warps_per_team = threads_per_row / kWarpSize;
  float total = 0.0f;
  for (int w = 0; w < warps_per_team; ++w) {
    total += scratch[threadIdx.y * warps_per_team + w];
  }
  __syncthreads();
  return total;
}

template <typename T, bool kAligned>
__global__ void __launch_bounds__(kBlockThreads)
    forward_kernel(const T* __restrict__ mu, const T* __restrict__ logvar, T* __restrict__ z,
                   float* __restrict__ kl_parts, int64_t rows, int64_t row_size,
                   int64_t num_samples, int64_t groups_per_row, int64_t row_tiles,
                   KeySource key_source) {
  __shared__ float scratch[kBlockThreads / kWarpSize];
  const uint64_t key = key_source.device_pointer != nullptr
                           ? static_cast<uint64_t>(__ldg(key_source.device_pointer))
                           : key_source.value;
  const int64_t part = blockIdx.x;
  const int64_t group = part * blockDim.x + threadIdx.x;
  const bool has_group = group < groups_per_row;
  const int64_t left_in_row = row_size - kGroupSize * group;
  const int count = has_group ? static_cast<int>(left_in_row < kGroupSize ? left_in_row : kGroupSize) : 0;

  for (int64_t tile = blockIdx.y; tile < row_tiles; tile += gridDim.y) {
    const int64_t row = tile * blockDim.y + threadIdx.y;
    const bool active = has_group && row < rows;
    const int64_t offset = row * row_size + kGroupSize * group;
    float m[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float lv[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float sd[4];
    if (active) {
      load_group<T, kAligned>(mu + offset, count, m);
      load_group<T, kAligned>(logvar + offset, count, lv);
    }
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      sd[lane] = standard_deviation(lv[lane]);
    }
    if (blockIdx.z == 0) {
      float kl = 0.0f;
#pragma unroll
      for (int lane = 0; lane < 4; ++lane) {
        kl += lane < count && active ? kl_term(m[lane], lv[lane], sd[lane]) : 0.0f;
      }
      kl = team_sum(kl, blockDim.x, scratch);
      if (threadIdx.x == 0 && row < rows) {
        kl_parts[row * gridDim.x + part] = -0.5f * kl;
      }
    }
    if (!active) {
      continue;
    }
    for (int64_t sample = blockIdx.z; sample < num_samples; sample += gridDim.z) {
      float noise[4];
      group_normals(key, static_cast<uint32_t>(sample), static_cast<uint64_t>(row), group, noise);
      float out[4];
#pragma unroll
      for (int lane = 0; lane < 4; ++lane) {
        out[lane] = m[lane] + sd[lane] * noise[lane];
      }
      store_group<T, kAligned>(z + sample * rows * row_size + offset, count, out);
    }
  }
}

template <typename T, bool kAligned>
__global__ void __launch_bounds__(kBlockThreads)
    backward_kernel(const T* __restrict__ grad_z, const float* __restrict__ grad_kl,
                    const T* __restrict__ z, const T* __restrict__ mu,
                    const T* __restrict__ logvar, T* __restrict__ grad_mu,
                    T* __restrict__ grad_logvar, int64_t rows, int64_t row_size,
                    int64_t num_samples, int64_t groups_per_row, int64_t row_tiles) {
  const int64_t group = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (group >= groups_per_row) {
    return;
  }
  const int64_t left_in_row = row_size - kGroupSize * group;
  const int count = static_cast<int>(left_in_row < kGroupSize ? left_in_row : kGroupSize);
  for (int64_t tile = blockIdx.y; tile < row_tiles; tile += gridDim.y) {
    const int64_t row = tile * blockDim.y + threadIdx.y;
    if (row >= rows) {
      continue;
    }
    const int64_t offset = row * row_size + kGroupSize * group;
    float m[4], lv[4];
    load_group<T, kAligned>(mu + offset, count, m);
    load_group<T, kAligned>(logvar + offset, count, lv);
    float grad_sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float grad_noise_sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (grad_z != nullptr) {
      for (int64_t sample = 0; sample < num_samples; ++sample) {
        const int64_t at = sample * rows * row_size + offset;
        float g[4], zs[4];
        load_group<T, kAligned>(grad_z + at, count, g);
        load_group<T, kAligned>(z + at, count, zs);
#pragma unroll
        for (int lane = 0; lane < 4; ++lane) {
          grad_sum[lane] += g[lane];
          grad_noise_sum[lane] += g[lane] * (zs[lane] - m[lane]);
        }
      }
    }
    const float gkl = grad_kl != nullptr ? grad_kl[row] : 0.0f;
    float out_mu[4], out_logvar[4];
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      out_mu[lane] = grad_sum[lane] + gkl * m[lane];
      out_logvar[lane] =
          0.5f * grad_noise_sum[lane] + gkl * kl_grad_logvar(standard_deviation(lv[lane]));
    }
    store_group<T, kAligned>(grad_mu + offset, count, out_mu);
    store_group<T, kAligned>(grad_logvar + offset, count, out_logvar);
  }
}

template <typename T>
bool all_aligned(std::initializer_list<const void*> pointers, int64_t row_size) {
  const auto bytes = static_cast<uintptr_t>(kGroupSize * sizeof(T));
  if (row_size % kGroupSize != 0) {
    return false;
  }
  for (const void* p : pointers) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % bytes != 0) {
      return false;
    }
  }
  return true;
}

template <typename T>
void launch_forward(const ForwardArgs& a, const Tiling& t, int multiprocessor_count,
                    cudaStream_t stream) {
  const int64_t grid_y = std::min(t.row_tiles, kMaxGridYZ);
  const int64_t blocks_xy = t.parts_per_row * grid_y;
  const int64_t wanted_blocks = 8LL * std::max(1, multiprocessor_count);
  const int64_t sample_slices =
      std::min({a.num_samples, kMaxGridYZ, std::max<int64_t>(1, wanted_blocks / blocks_xy)});
  const dim3 grid(static_cast<unsigned>(t.parts_per_row), static_cast<unsigned>(grid_y),
                  static_cast<unsigned>(sample_slices));
  const dim3 block(t.threads_per_row, t.rows_per_block);
  const auto* mu = static_cast<const T*>(a.mu);
  const auto* logvar = static_cast<const T*>(a.logvar);
  auto* z = static_cast<T*>(a.z);
  const auto kernel = all_aligned<T>({a.mu, a.logvar, a.z}, a.row_size) ? forward_kernel<T, true>
                                                                         : forward_kernel<T, false>;
  kernel<<<grid, block, 0, stream>>>(mu, logvar, z, a.kl_parts, a.rows, a.row_size, a.num_samples,
                                     t.groups_per_row, t.row_tiles, a.key);
}

template <typename T>
void launch_backward(const BackwardArgs& a, const Tiling& t, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(t.parts_per_row),
                  static_cast<unsigned>(std::min(t.row_tiles, kMaxGridYZ)), 1);
  const dim3 block(t.threads_per_row, t.rows_per_block);
  const bool aligned =
      all_aligned<T>({a.grad_z, a.z, a.mu, a.logvar, a.grad_mu, a.grad_logvar}, a.row_size);
  const auto kernel = aligned ? backward_kernel<T, true> : backward_kernel<T, false>;
  kernel<<<grid, block, 0, stream>>>(
      static_cast<const T*>(a.grad_z), a.grad_kl, static_cast<const T*>(a.z),
      static_cast<const T*>(a.mu), static_cast<const T*>(a.logvar), static_cast<T*>(a.grad_mu),
      static_cast<T*>(a.grad_logvar), a.rows, a.row_size, a.num_samples, t.groups_per_row,
      t.row_tiles);
}

}  // namespace

int64_t cuda_forward_kl_parts_per_row(int64_t row_size) {
  return make_tiling(1, row_size).parts_per_row;
}

int cuda_forward(const ForwardArgs& args, int multiprocessor_count, void* stream) {
  const Tiling tiling = make_tiling(args.rows, args.row_size);
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  switch (args.dtype) {
    case DType::kFloat32:
      launch_forward<float>(args, tiling, multiprocessor_count, cuda_stream);
      break;
    case DType::kFloat16:
      launch_forward<__half>(args, tiling, multiprocessor_count, cuda_stream);
      break;
    case DType::kBFloat16:
      launch_forward<__nv_bfloat16>(args, tiling, multiprocessor_count, cuda_stream);
      break;
  }
  return static_cast<int>(cudaGetLastError());
}

int cuda_backward(const BackwardArgs& args, void* stream) {
  const Tiling tiling = make_tiling(args.rows, args.row_size);
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  switch (args.dtype) {
    case DType::kFloat32:
      launch_backward<float>(args, tiling, cuda_stream);
      break;
    case DType::kFloat16:
      launch_backward<__half>(args, tiling, cuda_stream);
      break;
    case DType::kBFloat16:
      launch_backward<__nv_bfloat16>(args, tiling, cuda_stream);
      break;
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace reparameterize
}  // namespace dfkd_fast
