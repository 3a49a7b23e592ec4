// CPU kernels of dfkd_fast::bn_stat_loss and dfkd_fast::bn_stat_loss_backward.
//
// x is (N, C, S) (S = prod of the spatial sizes). Per channel, the statistics are accumulated in
// one pass as double-precision sums of x - K and (x - K)^2 with K = x[0, c, 0]: shifted, so that
// large channel means do not cancel, and in double, so that the variance
// ((sum of squares) - sum^2 / M) / M keeps float32 accuracy. The same pass can write the eval
// BatchNorm output y = x * scale[c] + shift[c]. Channel-major layouts (NCHW) are split by channel;
// channel-minor ones (channels_last, (N, C)) by fixed blocks of rows whose partial sums are added
// in block order: results do not depend on the thread count. Backward is one elementwise pass.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <utility>
#include <vector>

#include "common.h"

namespace dfkd_fast {
namespace bn_stats {
namespace {

using cpu::run_tasks;

constexpr int kLanes = 8;
constexpr int64_t kRowsPerBlock = 256;  // channel-minor layouts: rows per task
constexpr int64_t kGrainElements = 1 << 16;
constexpr int64_t kMaxRunValues = 64;  // a run of rows narrower than 64 bytes: under 128 bytes

struct Layout {
  int64_t N, C, S;
  int64_t stride_n, stride_c, stride_s;
  int64_t run;  // values per run of a channel-minor block (see values_per_run); C if channel-major
};

bool is_channel_major(const Layout& layout) { return layout.stride_c != 1 || layout.C == 1; }

// The kernels' per-channel vectors hold one value per position of a run: position j, channel
// j % C (channel-major: one per channel).
struct ForwardArgs {
  Layout x;
  const void* data;
  void* y;  // same strides as x, or null
  const float* scale;
  const float* shift;
  const float* first_row;  // channel-minor: x's first row, the shift K of the sums
  double* sums;            // channel-major: (C, 2); channel-minor: (blocks, C, 2)
};

struct BackwardArgs {
  Layout x;
  const void* data;
  const void* grad_y;  // same strides as x, or null
  void* grad_x;        // same strides as x
  const float* scale;
  const float* mean;
  const float* coefficient_mean;  // d loss / d x = coefficient_mean[c] + coefficient_var[c] (x - mean)
  const float* coefficient_var;
};

// Channel-major: one channel per task, a contiguous run of S values per sample, summed in double
// lanes.
template <typename scalar_t, bool kWriteY>
DFKD_ALWAYS_INLINE void forward_channel(const ForwardArgs& a, int64_t c) {
  const auto* data = static_cast<const scalar_t*>(a.data);
  auto* y = static_cast<scalar_t*>(a.y);
  const float k = static_cast<float>(data[c * a.x.stride_c]);
  const float scale = kWriteY ? a.scale[c] : 0.0f;
  const float shift = kWriteY ? a.shift[c] : 0.0f;
  double sum_lanes[kLanes] = {}, square_lanes[kLanes] = {};
  for (int64_t n = 0; n < a.x.N; ++n) {
    const int64_t offset = n * a.x.stride_n + c * a.x.stride_c;
    const scalar_t* run = data + offset;
    int64_t s = 0;
    for (; s + kLanes <= a.x.S; s += kLanes) {
      for (int lane = 0; lane < kLanes; ++lane) {
        const double d = static_cast<double>(static_cast<float>(run[s + lane]) - k);
        sum_lanes[lane] += d;
        square_lanes[lane] += d * d;
      }
    }
    for (int lane = 0; s < a.x.S; ++s, ++lane) {
      const double d = static_cast<double>(static_cast<float>(run[s]) - k);
      sum_lanes[lane] += d;
      square_lanes[lane] += d * d;
    }
    if (kWriteY) {  // a second loop over the run, still in cache: both loops vectorise
      scalar_t* y_run = y + offset;
      for (s = 0; s < a.x.S; ++s) {
        y_run[s] = cpu::rounded<scalar_t>(static_cast<float>(run[s]) * scale + shift);
      }
    }
  }
  double sum = 0.0, squares = 0.0;
  for (int lane = 0; lane < kLanes; ++lane) {
    sum += sum_lanes[lane];
    squares += square_lanes[lane];
  }
  a.sums[2 * c] = sum;
  a.sums[2 * c + 1] = squares;
}

// The values of a channel-minor block: [begin, end) of the flattened tensor.
std::pair<int64_t, int64_t> block_values(const Layout& x, int64_t block) {
  const int64_t first_row = block * kRowsPerBlock;
  const int64_t last_row = std::min(x.N * x.S, first_row + kRowsPerBlock);
  return {first_row * x.C, last_row * x.C};
}

// Channel-minor: one block of rows (n, s) per task, C contiguous values per row (row r at r * C),
// summed per channel in double. The restrict pointers let GCC vectorise across the channels.
template <typename scalar_t, bool kWriteY>
DFKD_ALWAYS_INLINE void forward_rows(const ForwardArgs& a, int64_t block) {
  const scalar_t* __restrict__ data = static_cast<const scalar_t*>(a.data);
  scalar_t* __restrict__ y = static_cast<scalar_t*>(a.y);
  const float* __restrict__ scale = a.scale;
  const float* __restrict__ shift = a.shift;
  const int64_t C = a.x.C;
  std::vector<float> k_values(C);
  std::vector<double> sum_values(C, 0.0), square_values(C, 0.0);
  float* __restrict__ k = k_values.data();
  double* __restrict__ sum = sum_values.data();
  double* __restrict__ squares = square_values.data();
  for (int64_t c = 0; c < C; ++c) {
    k[c] = static_cast<float>(data[c]);
  }
  const int64_t first = block * kRowsPerBlock;
  const int64_t last = std::min(a.x.N * a.x.S, first + kRowsPerBlock);
  for (int64_t row = first; row < last; ++row) {
    const scalar_t* __restrict__ values = data + row * C;
    for (int64_t c = 0; c < C; ++c) {
      const double d = static_cast<double>(static_cast<float>(values[c]) - k[c]);
      sum[c] += d;
      squares[c] += d * d;
    }
    if (kWriteY) {
      scalar_t* __restrict__ y_row = y + row * C;
      for (int64_t c = 0; c < C; ++c) {
        y_row[c] = cpu::rounded<scalar_t>(static_cast<float>(values[c]) * scale[c] + shift[c]);
      }
    }
  }
  double* sums = a.sums + block * C * 2;
  for (int64_t c = 0; c < C; ++c) {
    sums[2 * c] = sum[c];
    sums[2 * c + 1] = squares[c];
  }
}

// Sums `count` values of a run per position, and writes their y.
template <typename scalar_t, bool kWriteY>
DFKD_ALWAYS_INLINE void forward_run(const scalar_t* __restrict__ values, scalar_t* __restrict__ y,
                                    int64_t count, const float* __restrict__ k,
                                    const float* __restrict__ scale,
                                    const float* __restrict__ shift, double* __restrict__ sum,
                                    double* __restrict__ squares) {
  for (int64_t j = 0; j < count; ++j) {
    const double d = static_cast<double>(static_cast<float>(values[j]) - k[j]);
    sum[j] += d;
    squares[j] += d * d;
  }
  if (kWriteY) {  // a second loop over the run, still in cache: both loops vectorise
    for (int64_t j = 0; j < count; ++j) {
      y[j] = cpu::rounded<scalar_t>(static_cast<float>(values[j]) * scale[j] + shift[j]);
    }
  }
}

// Channel-minor rows narrower than a vector: one block of rows per task, summed per position of
// a run in double, then per channel in position order.
template <typename scalar_t, bool kWriteY>
DFKD_ALWAYS_INLINE void forward_runs(const ForwardArgs& a, int64_t block) {
  const auto* data = static_cast<const scalar_t*>(a.data);
  auto* y = static_cast<scalar_t*>(a.y);
  const int64_t C = a.x.C, run = a.x.run;
  // On the stack and 64-byte aligned: with the sums, updated in place for every run, in a heap
  // vector, the forward took 0.7 or 1.4 ms by process (by its alignment, most likely).
  alignas(64) double sum[kMaxRunValues] = {};
  alignas(64) double squares[kMaxRunValues] = {};
  const auto [begin, end] = block_values(a.x, block);
  int64_t start = begin;
  for (; start + run <= end; start += run) {
    forward_run<scalar_t, kWriteY>(data + start, kWriteY ? y + start : nullptr, run, a.first_row,
                                   a.scale, a.shift, sum, squares);
  }
  if (start < end) {  // the block's last rows, fewer than a run: position j is channel j % C
    forward_run<scalar_t, kWriteY>(data + start, kWriteY ? y + start : nullptr, end - start,
                                   a.first_row, a.scale, a.shift, sum, squares);
  }
  double* sums = a.sums + block * C * 2;
  std::fill(sums, sums + 2 * C, 0.0);
  for (int64_t j = 0; j < run; ++j) {
    sums[2 * (j % C)] += sum[j];
    sums[2 * (j % C) + 1] += squares[j];
  }
}

template <typename scalar_t>
DFKD_ALWAYS_INLINE void backward_channel(const BackwardArgs& a, int64_t c) {
  const auto* data = static_cast<const scalar_t*>(a.data);
  const auto* grad_y = static_cast<const scalar_t*>(a.grad_y);
  auto* grad_x = static_cast<scalar_t*>(a.grad_x);
  const float scale = a.scale != nullptr ? a.scale[c] : 0.0f;
  const float mean = a.mean[c], coefficient_mean = a.coefficient_mean[c];
  const float coefficient_var = a.coefficient_var[c];
  for (int64_t n = 0; n < a.x.N; ++n) {
    const int64_t offset = n * a.x.stride_n + c * a.x.stride_c;
    for (int64_t s = 0; s < a.x.S; ++s) {
      float grad = coefficient_mean +
                   coefficient_var * (static_cast<float>(data[offset + s]) - mean);
      if (grad_y != nullptr) {
        grad += static_cast<float>(grad_y[offset + s]) * scale;
      }
      grad_x[offset + s] = cpu::rounded<scalar_t>(grad);
    }
  }
}

// The gradient of `count` values of a run.
template <typename scalar_t, bool kHasGradY>
DFKD_ALWAYS_INLINE void backward_run(const scalar_t* __restrict__ data,
                                     const scalar_t* __restrict__ grad_y,
                                     scalar_t* __restrict__ grad_x, int64_t count,
                                     const float* __restrict__ scale,
                                     const float* __restrict__ mean,
                                     const float* __restrict__ coefficient_mean,
                                     const float* __restrict__ coefficient_var) {
  for (int64_t j = 0; j < count; ++j) {
    float grad = coefficient_mean[j] + coefficient_var[j] * (static_cast<float>(data[j]) - mean[j]);
    if (kHasGradY) {
      grad += static_cast<float>(grad_y[j]) * scale[j];
    }
    grad_x[j] = cpu::rounded<scalar_t>(grad);
  }
}

template <typename scalar_t, bool kHasGradY>
DFKD_ALWAYS_INLINE void backward_rows_for(const BackwardArgs& a, int64_t block) {
  const scalar_t* __restrict__ data = static_cast<const scalar_t*>(a.data);
  const scalar_t* __restrict__ grad_y = static_cast<const scalar_t*>(a.grad_y);
  scalar_t* __restrict__ grad_x = static_cast<scalar_t*>(a.grad_x);
  const float* __restrict__ scale = a.scale;
  const float* __restrict__ mean = a.mean;
  const float* __restrict__ coefficient_mean = a.coefficient_mean;
  const float* __restrict__ coefficient_var = a.coefficient_var;
  const int64_t C = a.x.C;
  const int64_t first = block * kRowsPerBlock;
  const int64_t last = std::min(a.x.N * a.x.S, first + kRowsPerBlock);
  for (int64_t row = first; row < last; ++row) {
    const int64_t offset = row * C;  // channel-minor rows are contiguous
    for (int64_t c = 0; c < C; ++c) {
      float grad = coefficient_mean[c] +
                   coefficient_var[c] * (static_cast<float>(data[offset + c]) - mean[c]);
      if (kHasGradY) {
        grad += static_cast<float>(grad_y[offset + c]) * scale[c];
      }
      grad_x[offset + c] = cpu::rounded<scalar_t>(grad);
    }
  }
}

template <typename scalar_t, bool kHasGradY>
DFKD_ALWAYS_INLINE void backward_runs_for(const BackwardArgs& a, int64_t block) {
  const auto* data = static_cast<const scalar_t*>(a.data);
  const auto* grad_y = static_cast<const scalar_t*>(a.grad_y);
  auto* grad_x = static_cast<scalar_t*>(a.grad_x);
  const int64_t run = a.x.run;
  const auto [begin, end] = block_values(a.x, block);
  int64_t start = begin;
  for (; start + run <= end; start += run) {
    backward_run<scalar_t, kHasGradY>(data + start, kHasGradY ? grad_y + start : nullptr,
                                      grad_x + start, run, a.scale, a.mean, a.coefficient_mean,
                                      a.coefficient_var);
  }
  if (start < end) {  // the block's last rows, fewer than a run
    backward_run<scalar_t, kHasGradY>(data + start, kHasGradY ? grad_y + start : nullptr,
                                      grad_x + start, end - start, a.scale, a.mean,
                                      a.coefficient_mean, a.coefficient_var);
  }
}

template <typename scalar_t>
DFKD_ALWAYS_INLINE void backward_rows(const BackwardArgs& a, int64_t block) {
  if (a.x.run == a.x.C) {
    a.grad_y != nullptr ? backward_rows_for<scalar_t, true>(a, block)
                        : backward_rows_for<scalar_t, false>(a, block);
  } else {
    a.grad_y != nullptr ? backward_runs_for<scalar_t, true>(a, block)
                        : backward_runs_for<scalar_t, false>(a, block);
  }
}

template <typename scalar_t, bool kWriteY>
DFKD_ALWAYS_INLINE void forward_tasks_for(const ForwardArgs& a, int64_t begin, int64_t end) {
  const bool channel_major = is_channel_major(a.x);
  for (int64_t task = begin; task < end; ++task) {
    if (channel_major) {
      forward_channel<scalar_t, kWriteY>(a, task);
    } else if (a.x.run == a.x.C) {
      forward_rows<scalar_t, kWriteY>(a, task);
    } else {
      forward_runs<scalar_t, kWriteY>(a, task);
    }
  }
}

template <typename scalar_t>
DFKD_ALWAYS_INLINE void forward_tasks(const ForwardArgs& a, int64_t begin, int64_t end) {
  a.y != nullptr ? forward_tasks_for<scalar_t, true>(a, begin, end)
                 : forward_tasks_for<scalar_t, false>(a, begin, end);
}

template <typename scalar_t>
DFKD_ALWAYS_INLINE void backward_tasks(const BackwardArgs& a, int64_t begin, int64_t end) {
  const bool channel_major = is_channel_major(a.x);
  for (int64_t task = begin; task < end; ++task) {
    channel_major ? backward_channel<scalar_t>(a, task) : backward_rows<scalar_t>(a, task);
  }
}

DFKD_DTYPE_CLONES(forward_kernels, ForwardArgs, forward_tasks)
DFKD_DTYPE_CLONES(backward_kernels, BackwardArgs, backward_tasks)

// ---------------------------------------------------------------------------------------------
// Torch side
// ---------------------------------------------------------------------------------------------

// Channel-minor rows narrower than a 64-byte vector are read in runs of whole rows that fill one,
// so that the loops over a run vectorise however few channels a row has (a loop over one row of
// 16 bfloat16 channels is shorter than GCC's vector loop, which then never runs). The rows of a
// run are contiguous, and its value j is of channel j % C. Wider rows are read row by row.
int64_t values_per_run(const Layout& layout, int64_t element_size) {
  constexpr int64_t kVectorBytes = 64;
  if (is_channel_major(layout)) {
    return layout.C;
  }
  int64_t rows = 1;
  while (rows * layout.C * element_size < kVectorBytes && rows < kRowsPerBlock) {
    rows *= 2;  // a power of two, so that a full block is whole runs
  }
  TORCH_INTERNAL_ASSERT(rows == 1 || rows * layout.C <= kMaxRunValues);
  return rows * layout.C;
}

// A per-channel vector (float32, C) as the kernels read it: one value per position of a run.
at::Tensor per_position(const at::Tensor& per_channel, const Layout& layout) {
  if (!per_channel.defined() || layout.run == layout.C) {
    return per_channel;
  }
  return per_channel.repeat({layout.run / layout.C}).contiguous();
}

// x as (N, C, S) in a layout the kernels handle: channel-major with contiguous S, or
// channel-minor with contiguous C (channels_last, (N, C)); anything else is made contiguous.
std::pair<at::Tensor, Layout> prepare(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() >= 2, "x must have shape (N, C, *), got ", x.sizes());
  TORCH_CHECK_VALUE(x.device().is_cpu(), "the C++ bn_stat_loss kernels take CPU tensors");
  cpu::dtype_index(x, "x");
  const int64_t N = x.size(0), C = x.size(1), S = x.numel() / std::max<int64_t>(N * C, 1);
  TORCH_CHECK_VALUE(N * S >= 2, "x must hold at least 2 values per channel, got shape ",
                    x.sizes());
  auto layout_of = [&](const at::Tensor& t) -> std::optional<Layout> {
    const at::Tensor ncs = t.dim() == 2 ? t.unsqueeze(-1) : t.view({N, C, -1});
    Layout layout{N, C, S, ncs.stride(0), ncs.stride(1), ncs.stride(2), C};
    const bool channel_major = layout.stride_s == 1 || S == 1;
    const bool channel_minor = layout.stride_c == 1 && (S == 1 || layout.stride_s == C) &&
                               layout.stride_n == S * C;
    if (channel_minor || (channel_major && layout.stride_c != 1) ||
        (channel_major && C == 1)) {
      layout.run = values_per_run(layout, t.element_size());
      return layout;
    }
    return std::nullopt;
  };
  std::optional<Layout> layout;
  if (x.is_non_overlapping_and_dense()) {  // outputs allocated like x then share its strides
    try {
      layout = layout_of(x);
    } catch (const c10::Error&) {  // no (N, C, S) view of these strides
    }
  }
  if (layout.has_value()) {
    return {x, *layout};
  }
  const at::Tensor contiguous = x.contiguous();
  return {contiguous, *layout_of(contiguous)};
}

at::Tensor channel_vector(const std::optional<at::Tensor>& value, int64_t C, const char* name) {
  if (!value.has_value()) {
    return at::Tensor();
  }
  TORCH_CHECK_VALUE(value->dim() == 1 && value->size(0) == C, name, " must have shape (", C,
                    "), got ", value->sizes());
  return value->to(at::kFloat).contiguous();
}

int64_t tasks_for(const Layout& layout) {
  return is_channel_major(layout) ? layout.C
                                  : (layout.N * layout.S + kRowsPerBlock - 1) / kRowsPerBlock;
}

int64_t grain_for(const Layout& layout) {
  const int64_t per_task = layout.N * layout.S * layout.C / std::max<int64_t>(tasks_for(layout), 1);
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(per_task, 1));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_stat_loss_cpu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& running_mean_in,
    const std::optional<at::Tensor>& running_var_in, const std::optional<at::Tensor>& ema_mean_in,
    const std::optional<at::Tensor>& ema_var_in, double momentum,
    const std::optional<at::Tensor>& scale_in, const std::optional<at::Tensor>& shift_in) {
  auto [x, layout] = prepare(x_in);
  const int64_t C = layout.C;
  const at::Tensor running_mean = channel_vector(running_mean_in, C, "running_mean");
  const at::Tensor running_var = channel_vector(running_var_in, C, "running_var");
  const at::Tensor ema_mean = channel_vector(ema_mean_in, C, "ema_mean");
  const at::Tensor ema_var = channel_vector(ema_var_in, C, "ema_var");
  const at::Tensor scale = channel_vector(scale_in, C, "scale");
  const at::Tensor shift = channel_vector(shift_in, C, "shift");
  TORCH_CHECK_VALUE(running_mean.defined() == running_var.defined(),
                    "running_mean and running_var go together");
  TORCH_CHECK_VALUE(scale.defined() == shift.defined(), "scale and shift go together");
  TORCH_CHECK_VALUE(ema_mean.defined() == ema_var.defined(), "ema_mean and ema_var go together");

  const auto float_options = x.options().dtype(at::kFloat);
  at::Tensor y = scale.defined() ? at::empty_like(x) : at::empty({0}, x.options());
  const int64_t tasks = tasks_for(layout);
  const bool channel_major = is_channel_major(layout);
  at::Tensor sums = at::empty({channel_major ? C : tasks * C, 2}, x.options().dtype(at::kDouble));
  const at::Tensor first_row = x.view({layout.N, C, -1}).select(0, 0).select(1, 0).to(at::kFloat);
  const at::Tensor scale_per_position = per_position(scale, layout);
  const at::Tensor shift_per_position = per_position(shift, layout);
  const at::Tensor first_row_per_position = per_position(first_row.contiguous(), layout);
  const ForwardArgs args{layout,
                         x.data_ptr(),
                         scale.defined() ? y.data_ptr() : nullptr,
                         scale.defined() ? scale_per_position.data_ptr<float>() : nullptr,
                         scale.defined() ? shift_per_position.data_ptr<float>() : nullptr,
                         first_row_per_position.data_ptr<float>(),
                         sums.data_ptr<double>()};
  run_tasks(args, cpu::dtype_index(x, "x"), tasks, grain_for(layout), forward_kernels);

  // Per channel: sums over the blocks in order, then mean and biased variance.
  const at::Tensor totals = channel_major ? sums : sums.view({tasks, C, 2}).sum(0);
  const double count = static_cast<double>(layout.N * layout.S);
  const at::Tensor shifted_mean = totals.select(1, 0) / count;
  const at::Tensor var64 = (totals.select(1, 1) / count - shifted_mean * shifted_mean).clamp_min(0);
  const at::Tensor mean = (shifted_mean + first_row.to(at::kDouble)).to(at::kFloat);
  const at::Tensor var = var64.to(at::kFloat);

  at::Tensor loss = at::empty({0}, float_options), norms = at::empty({0}, float_options);
  if (running_mean.defined()) {
    at::Tensor blended_mean = mean, blended_var = var;
    if (ema_mean.defined()) {
      blended_mean = mean * (1.0 - momentum) + ema_mean * momentum;
      blended_var = var * (1.0 - momentum) + ema_var * momentum;
    }
    norms = at::stack({at::linalg_vector_norm(blended_mean - running_mean),
                       at::linalg_vector_norm(blended_var - running_var)});
    loss = norms.sum();
  }
  return {loss, mean, var, y, norms};
}

at::Tensor bn_stat_loss_backward_cpu(
    const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& var, const at::Tensor& norms,
    const std::optional<at::Tensor>& running_mean_in,
    const std::optional<at::Tensor>& running_var_in, const std::optional<at::Tensor>& ema_mean_in,
    const std::optional<at::Tensor>& ema_var_in, double momentum,
    const std::optional<at::Tensor>& scale_in, const std::optional<at::Tensor>& grad_loss,
    const std::optional<at::Tensor>& grad_mean, const std::optional<at::Tensor>& grad_var,
    const std::optional<at::Tensor>& grad_y_in) {
  auto [x, layout] = prepare(x_in);
  const int64_t C = layout.C;
  const double count = static_cast<double>(layout.N * layout.S);
  const at::Tensor mean32 = channel_vector(mean, C, "mean");
  // d loss / d mean and d loss / d var, then the per-channel coefficients of the elementwise pass.
  at::Tensor g_mean = grad_mean.has_value() ? channel_vector(grad_mean, C, "grad_mean")
                                            : at::zeros({C}, mean32.options());
  at::Tensor g_var = grad_var.has_value() ? channel_vector(grad_var, C, "grad_var")
                                          : at::zeros({C}, mean32.options());
  if (grad_loss.has_value()) {
    const at::Tensor running_mean = channel_vector(running_mean_in, C, "running_mean");
    const at::Tensor running_var = channel_vector(running_var_in, C, "running_var");
    TORCH_CHECK_VALUE(running_mean.defined() && norms.numel() == 2,
                      "grad_loss needs the running statistics and the forward's norms");
    const at::Tensor ema_mean = channel_vector(ema_mean_in, C, "ema_mean");
    const at::Tensor ema_var = channel_vector(ema_var_in, C, "ema_var");
    at::Tensor blended_mean = mean32, blended_var = channel_vector(var, C, "var");
    const double weight = ema_mean.defined() ? 1.0 - momentum : 1.0;
    if (ema_mean.defined()) {
      blended_mean = blended_mean * (1.0 - momentum) + ema_mean * momentum;
      blended_var = blended_var * (1.0 - momentum) + ema_var * momentum;
    }
    const at::Tensor norms32 = norms.to(at::kFloat);
    const at::Tensor g = grad_loss->to(at::kFloat) * weight;
    // A zero norm contributes no gradient.
    const at::Tensor safe_norms = at::where(norms32 > 0, norms32, at::ones_like(norms32));
    const at::Tensor live = (norms32 > 0).to(at::kFloat);
    g_mean = g_mean + g * live[0] * (blended_mean - running_mean) / safe_norms[0];
    g_var = g_var + g * live[1] * (blended_var - running_var) / safe_norms[1];
  }
  const at::Tensor coefficient_mean = per_position((g_mean / count).contiguous(), layout);
  const at::Tensor coefficient_var = per_position((g_var * (2.0 / count)).contiguous(), layout);
  const at::Tensor mean_per_position = per_position(mean32, layout);
  const at::Tensor scale = per_position(channel_vector(scale_in, C, "scale"), layout);
  at::Tensor grad_y;
  if (grad_y_in.has_value()) {
    TORCH_CHECK_VALUE(scale.defined() && grad_y_in->sizes() == x.sizes(),
                      "grad_y needs scale and the shape of x");
    grad_y = grad_y_in->to(x.scalar_type());
    if (grad_y.strides() != x.strides()) {
      grad_y = at::empty_like(x).copy_(grad_y);
    }
  }
  at::Tensor grad_x = at::empty_like(x);
  TORCH_INTERNAL_ASSERT(grad_x.strides() == x.strides());
  const BackwardArgs args{layout,
                          x.data_ptr(),
                          grad_y.defined() ? grad_y.data_ptr() : nullptr,
                          grad_x.data_ptr(),
                          scale.defined() ? scale.data_ptr<float>() : nullptr,
                          mean_per_position.data_ptr<float>(),
                          coefficient_mean.data_ptr<float>(),
                          coefficient_var.data_ptr<float>()};
  run_tasks(args, cpu::dtype_index(x, "x"), tasks_for(layout), grain_for(layout),
            backward_kernels);
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(dfkd_fast, CPU, m) {
  m.impl("bn_stat_loss", &bn_stat_loss_cpu);
  m.impl("bn_stat_loss_backward", &bn_stat_loss_backward_cpu);
}

}  // namespace bn_stats
}  // namespace dfkd_fast
