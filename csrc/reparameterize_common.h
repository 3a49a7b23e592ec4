// The sampling rule of dfkd_fast::reparameterize, shared by the CPU and CUDA kernels.
//
// mu and logvar are viewed as (rows, row_size): row_size is the last dimension, over which the KL
// divergence is summed. z has shape (num_samples, rows, row_size). The normal noise of element
// (s, r, d) is lane d % 4 of the Philox block with
//     counter = (d / 4, low 32 bits of r, high 32 bits of r, s),   key = the 64-bit call key,
// so every element's noise depends only on its coordinates and the key, never on how the work is
// split among threads. The same seed therefore gives the same samples on every device.
//
// This header includes no torch and no CUDA library headers.
#pragma once

#include <cstdint>

#include "philox.h"

namespace dfkd_fast {
namespace reparameterize {

constexpr int64_t kGroupSize = 4;  // elements per Philox block

DFKD_HOST_DEVICE philox::Words sample_counter(int64_t group, uint64_t row, uint32_t sample) {
  return philox::Words{static_cast<uint32_t>(group), static_cast<uint32_t>(row),
                       static_cast<uint32_t>(row >> 32), sample};
}

// Four normals for elements 4 * group .. 4 * group + 3 of row `row` in sample `sample`.
DFKD_HOST_DEVICE void group_normals(uint64_t key, uint32_t sample, uint64_t row, int64_t group,
                                    float out[4]) {
  philox::normals4(sample_counter(group, row, sample), key, out);
}

DFKD_HOST_DEVICE float standard_deviation(float logvar) { return math::exp_f32(0.5f * logvar); }

// One element's term of the KL divergence to N(0, I): KL = -0.5 * sum(term).
DFKD_HOST_DEVICE float kl_term(float mu, float logvar, float stddev) {
  return 1.0f + logvar - mu * mu - stddev * stddev;
}

// d KL / d logvar for one element; d KL / d mu is mu.
DFKD_HOST_DEVICE float kl_grad_logvar(float stddev) { return 0.5f * (stddev * stddev - 1.0f); }

// The data types the kernels read and write; arithmetic is always float32.
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Where the kernel finds the 64-bit key: in host memory (a CPU generator) or in device memory
// (a CUDA generator, so that no host sync is needed and CUDA graphs can capture the call).
struct KeySource {
  uint64_t value;
  const int64_t* device_pointer;  // null when `value` holds the key
};

// Arguments of the CUDA launchers (raw pointers to contiguous buffers).
struct ForwardArgs {
  DType dtype;
  const void* mu;
  const void* logvar;
  void* z;          // (num_samples, rows, row_size)
  float* kl_parts;  // (rows, kl_parts_per_row)
  int64_t rows;
  int64_t row_size;
  int64_t num_samples;
  int64_t kl_parts_per_row;  // filled in by forward_kl_parts_per_row()
  KeySource key;
};

struct BackwardArgs {
  DType dtype;
  const void* grad_z;    // (num_samples, rows, row_size) or null
  const float* grad_kl;  // (rows,) float32 or null
  const void* z;
  const void* mu;
  const void* logvar;
  void* grad_mu;
  void* grad_logvar;
  int64_t rows;
  int64_t row_size;
  int64_t num_samples;
};

// CUDA launchers, defined in cuda/reparameterize.cu. `stream` is a cudaStream_t; they return the
// cudaError_t of the launch.
int64_t cuda_forward_kl_parts_per_row(int64_t row_size);
int cuda_forward(const ForwardArgs& args, int multiprocessor_count, void* stream);
int cuda_backward(const BackwardArgs& args, void* stream);

}  // namespace reparameterize
}  // namespace dfkd_fast
