// CPU kernels of dfkd_fast::reparameterize and its backward.
//
// Work is split into tasks of (sample, row, part), a part being up to kGroupsPerTask Philox groups
// of one row, so a task's KL partial sum never depends on the thread count. Inner loops are
// written so that GCC vectorises them; target_clones compiles them for AVX-512, AVX2 and baseline
// x86-64 and picks one at load time.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>

#include "../reparameterize_torch.h"
#include "common.h"

namespace dfkd_fast {
namespace reparameterize {
namespace {

constexpr int64_t kGroupsPerTask = 1024;  // a task covers up to 4096 elements of one row
constexpr int kGroupsPerBlock = 64;       // noise for 256 elements lives on the stack
constexpr int kKlLanes = 8;               // independent partial sums, so the sum vectorises
using cpu::add_to_lanes;
using cpu::run_tasks;
using cpu::sum_lanes;
constexpr int64_t kGrainElements = 16384;

constexpr int64_t kElementsPerTask = kGroupSize * kGroupsPerTask;

// Tasks per row; a row of zero elements still gets one task, which writes its KL of 0.
int64_t parts_per_row(int64_t row_size) {
  return std::max<int64_t>(1, (row_size + kElementsPerTask - 1) / kElementsPerTask);
}

// Position in the (samples, rows, parts) task grid, advanced without a division per task. A plain
// loop rather than a callback, so the task body is compiled inside each target clone.
struct TaskCursor {
  int64_t rows, parts;
  int64_t sample, row, part;

  TaskCursor(int64_t task, int64_t rows_, int64_t parts_)
      : rows(rows_),
        parts(parts_),
        sample(task / (rows_ * parts_)),
        row((task / parts_) % rows_),
        part(task % parts_) {}

  void advance() {
    if (++part == parts) {
      part = 0;
      if (++row == rows) {
        row = 0;
        ++sample;
      }
    }
  }
};

DFKD_ALWAYS_INLINE void fill_normals(uint64_t key, uint32_t sample, uint64_t row,
                                     int64_t first_group, int count, float* noise) {
  for (int i = 0; i < count; ++i) {
    group_normals(key, sample, row, first_group + i, noise + kGroupSize * i);
  }
}

// z = mu + stddev * noise for `count` elements; with kWithKl also each element's KL term.
template <typename scalar_t, bool kWithKl>
DFKD_ALWAYS_INLINE void write_samples(const scalar_t* mu, const scalar_t* logvar,
                                      const float* noise, int64_t count, scalar_t* z,
                                      float* kl_terms) {
  for (int64_t i = 0; i < count; ++i) {
    const float m = static_cast<float>(mu[i]);
    const float lv = static_cast<float>(logvar[i]);
    const float sd = standard_deviation(lv);
    z[i] = cpu::rounded<scalar_t>(m + sd * noise[i]);
    if (kWithKl) {
      kl_terms[i] = kl_term(m, lv, sd);
    }
  }
}

template <typename scalar_t>
DFKD_ALWAYS_INLINE void forward_tasks(const ForwardArgs& args, int64_t begin, int64_t end) {
  const auto* mu = static_cast<const scalar_t*>(args.mu);
  const auto* logvar = static_cast<const scalar_t*>(args.logvar);
  auto* z = static_cast<scalar_t*>(args.z);
  const int64_t row_size = args.row_size;
  const int64_t groups_per_row = (row_size + kGroupSize - 1) / kGroupSize;
  const int64_t parts = args.kl_parts_per_row;
  alignas(64) float noise[kGroupSize * kGroupsPerBlock];
  alignas(64) float kl_terms[kGroupSize * kGroupsPerBlock];

  TaskCursor cursor(begin, args.rows, parts);
  for (int64_t task = begin; task < end; ++task, cursor.advance()) {
    const int64_t sample = cursor.sample, row = cursor.row, part = cursor.part;
    const scalar_t* mu_row = mu + row * row_size;
    const scalar_t* logvar_row = logvar + row * row_size;
    scalar_t* z_row = z + (sample * args.rows + row) * row_size;
    const int64_t group_end = std::min(groups_per_row, (part + 1) * kGroupsPerTask);
    float kl_lanes[kKlLanes] = {};
    for (int64_t group = part * kGroupsPerTask; group < group_end; group += kGroupsPerBlock) {
      const int count = static_cast<int>(std::min<int64_t>(kGroupsPerBlock, group_end - group));
      fill_normals(args.key.value, static_cast<uint32_t>(sample), static_cast<uint64_t>(row),
                   group, count, noise);
      const int64_t first = kGroupSize * group;
      const int64_t elements = std::min(row_size, first + kGroupSize * count) - first;
      if (sample == 0) {
        write_samples<scalar_t, true>(mu_row + first, logvar_row + first, noise, elements,
                                      z_row + first, kl_terms);
        add_to_lanes<kKlLanes>(kl_terms, elements, kl_lanes);
      } else {
        write_samples<scalar_t, false>(mu_row + first, logvar_row + first, noise, elements,
                                       z_row + first, kl_terms);
      }
    }
    if (sample == 0) {
      args.kl_parts[row * parts + part] = -0.5f * sum_lanes<kKlLanes>(kl_lanes);
    }
  }
}

template <typename scalar_t>
DFKD_ALWAYS_INLINE void backward_tasks(const BackwardArgs& args, int64_t begin, int64_t end) {
  const auto* grad_z = static_cast<const scalar_t*>(args.grad_z);
  const auto* z = static_cast<const scalar_t*>(args.z);
  const auto* mu = static_cast<const scalar_t*>(args.mu);
  const auto* logvar = static_cast<const scalar_t*>(args.logvar);
  auto* grad_mu = static_cast<scalar_t*>(args.grad_mu);
  auto* grad_logvar = static_cast<scalar_t*>(args.grad_logvar);
  const int64_t row_size = args.row_size;
  const int64_t sample_stride = args.rows * row_size;
  const int64_t parts = parts_per_row(row_size);

  TaskCursor cursor(begin, args.rows, parts);
  for (int64_t task = begin; task < end; ++task, cursor.advance()) {
    const int64_t row = cursor.row, part = cursor.part;
    const float grad_kl = args.grad_kl != nullptr ? args.grad_kl[row] : 0.0f;
    const int64_t first = row * row_size + part * kElementsPerTask;
    const int64_t last = row * row_size + std::min(row_size, (part + 1) * kElementsPerTask);
    for (int64_t i = first; i < last; ++i) {
      const float m = static_cast<float>(mu[i]);
      float grad_sum = 0.0f;
      float grad_noise_sum = 0.0f;  // sum of grad_z * (z - mu) = sum of grad_z * stddev * eps
      if (grad_z != nullptr) {
        for (int64_t sample = 0; sample < args.num_samples; ++sample) {
          const int64_t at = sample * sample_stride + i;
          const float g = static_cast<float>(grad_z[at]);
          grad_sum += g;
          grad_noise_sum += g * (static_cast<float>(z[at]) - m);
        }
      }
      const float sd = standard_deviation(static_cast<float>(logvar[i]));
      grad_mu[i] = cpu::rounded<scalar_t>(grad_sum + grad_kl * m);
      grad_logvar[i] =
          cpu::rounded<scalar_t>(0.5f * grad_noise_sum + grad_kl * kl_grad_logvar(sd));
    }
  }
}

DFKD_DTYPE_CLONES(forward_kernels, ForwardArgs, forward_tasks)
DFKD_DTYPE_CLONES(backward_kernels, BackwardArgs, backward_tasks)

int64_t grain_tasks(int64_t elements_per_task) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_task));
}

std::tuple<at::Tensor, at::Tensor> reparameterize_cpu(const at::Tensor& mu,
                                                      const at::Tensor& logvar,
                                                      int64_t num_samples,
                                                      std::optional<at::Generator> generator) {
  TORCH_CHECK_VALUE(!generator.has_value() || generator->device().is_cpu(),
                    "generator must be a CPU generator for CPU tensors, got one on ",
                    generator->device());
  ForwardBuffers b = prepare_forward(mu, logvar, num_samples, generator,
                                     parts_per_row(mu.dim() > 0 ? mu.size(-1) : 0));
  b.args.key = KeySource{static_cast<uint64_t>(b.key.item<int64_t>()), nullptr};
  const ForwardArgs& args = b.args;
  const int64_t tasks = num_samples * args.rows * args.kl_parts_per_row;
  const int64_t task_elements = std::min(args.row_size, kElementsPerTask);
  run_tasks(args, static_cast<int>(args.dtype), tasks, grain_tasks(task_elements),
            forward_kernels);
  return {b.z, b.kl()};
}

std::tuple<at::Tensor, at::Tensor> reparameterize_backward_cpu(
    const std::optional<at::Tensor>& grad_z, const std::optional<at::Tensor>& grad_kl,
    const at::Tensor& z, const at::Tensor& mu, const at::Tensor& logvar) {
  const BackwardBuffers b = prepare_backward(grad_z, grad_kl, z, mu, logvar);
  const BackwardArgs& args = b.args;
  const int64_t parts = parts_per_row(args.row_size);
  const int64_t task_elements = std::min(args.row_size, kElementsPerTask) * args.num_samples;
  run_tasks(args, static_cast<int>(args.dtype), args.rows * parts, grain_tasks(task_elements),
            backward_kernels);
  return {b.grad_mu, b.grad_logvar};
}

}  // namespace

TORCH_LIBRARY_IMPL(dfkd_fast, CPU, m) {
  m.impl("reparameterize", &reparameterize_cpu);
  m.impl("reparameterize_backward", &reparameterize_backward_cpu);
}

}  // namespace reparameterize
}  // namespace dfkd_fast
