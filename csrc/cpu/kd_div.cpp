// CPU kernels of dfkd_fast::kd_div and dfkd_fast::kd_div_backward.
//
// The same per-row statistics and formulas as the Triton kernels (dfkd_fast/ops/kd_div_triton.py
// documents them), evaluated row by row in float32: a first pass finds the row maxima of the raw
// logits, a second sums exp((x - m) / T) (and, for KL, exp((t - m_t) / T) d with
// d = (t - m_t) - (s - m_s)); JS reads the row a third time for its mixture terms. Backward is one
// pass. Rows are independent tasks; within a row, partial sums run in a fixed lane order.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../float_math.h"
#include "common.h"

namespace dfkd_fast {
namespace kd_div {
namespace {

using cpu::add_to_lanes;
using cpu::run_tasks;
using cpu::sum_lanes;
using math::exp_f32;
using math::log1p_f32;

constexpr int kLanes = 16;
constexpr int64_t kChunk = 256;  // logits converted to float32 at a time, on the stack
constexpr int64_t kNumStats = 6;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kGrainElements = 16384;

struct ForwardArgs {
  const void* student;  // (rows, cols), contiguous
  const void* teacher;
  const float* weight;  // (rows,) or null
  float* row_loss;      // (rows,): T^2 * divergence * weight
  float* stats;         // (rows, kNumStats)
  int64_t rows, cols;
  float inv_temperature, temperature_squared;
  bool js;
};

struct BackwardArgs {
  const void* student;
  const void* teacher;
  const float* weight;
  const float* stats;
  const float* grad_loss;  // (rows,) for reduction "none", else one value
  bool grad_per_row;
  void* grad_student;  // (rows, cols) or null
  void* grad_teacher;
  int64_t rows, cols;
  float inv_temperature, grad_scale;  // grad_scale = T * (reduction factor)
  bool js;
};

template <typename scalar_t>
DFKD_ALWAYS_INLINE void to_float(const scalar_t* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = static_cast<float>(x[i]);
  }
}

template <typename scalar_t>
DFKD_ALWAYS_INLINE void from_float(const float* x, int64_t n, scalar_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = cpu::rounded<scalar_t>(x[i]);
  }
}

DFKD_ALWAYS_INLINE void max_to_lanes(const float* x, int64_t n, float* lanes) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) {
      lanes[lane] = x[i + lane] > lanes[lane] ? x[i + lane] : lanes[lane];
    }
  }
  for (int lane = 0; i < n; ++i, ++lane) {
    lanes[lane] = x[i] > lanes[lane] ? x[i] : lanes[lane];
  }
}

DFKD_ALWAYS_INLINE float max_of_lanes(const float* lanes) {
  float m = lanes[0];
  for (int lane = 1; lane < kLanes; ++lane) {
    m = lanes[lane] > m ? lanes[lane] : m;
  }
  return m;
}

// A row maximum as the base of exp((x - base) / T); an all -inf row so far counts as 0.
DFKD_ALWAYS_INLINE float exponent_base(float row_max) { return row_max == kNegInf ? 0.0f : row_max; }

// log((p + q) / 2) from log p and log q, without forming p + q.
DFKD_ALWAYS_INLINE float log_mixture(float log_p, float log_q) {
  const float high = log_p > log_q ? log_p : log_q;
  const float low = log_p > log_q ? log_q : log_p;
  const float mixed = high + log1p_f32(exp_f32(low - high)) - kLn2;
  return high == kNegInf ? kNegInf : mixed;
}

template <typename scalar_t, bool kJs>
DFKD_ALWAYS_INLINE void forward_row(const ForwardArgs& a, int64_t row) {
  const auto* student = static_cast<const scalar_t*>(a.student) + row * a.cols;
  const auto* teacher = static_cast<const scalar_t*>(a.teacher) + row * a.cols;
  const float inv_t = a.inv_temperature;
  alignas(64) float s[kChunk], t[kChunk], w0[kChunk], w1[kChunk], w2[kChunk];

  float max_s_lanes[kLanes], max_t_lanes[kLanes];
  std::fill_n(max_s_lanes, kLanes, kNegInf);
  std::fill_n(max_t_lanes, kLanes, kNegInf);
  for (int64_t c0 = 0; c0 < a.cols; c0 += kChunk) {
    const int64_t n = std::min(kChunk, a.cols - c0);
    to_float(student + c0, n, s);
    to_float(teacher + c0, n, t);
    max_to_lanes(s, n, max_s_lanes);
    max_to_lanes(t, n, max_t_lanes);
  }
  const float m_s = max_of_lanes(max_s_lanes);
  const float m_t = max_of_lanes(max_t_lanes);
  const float base_s = exponent_base(m_s);
  const float base_t = exponent_base(m_t);

  float z_s_lanes[kLanes] = {}, z_t_lanes[kLanes] = {}, kl_lanes[kLanes] = {};
  for (int64_t c0 = 0; c0 < a.cols; c0 += kChunk) {
    const int64_t n = std::min(kChunk, a.cols - c0);
    to_float(student + c0, n, s);
    to_float(teacher + c0, n, t);
    for (int64_t i = 0; i < n; ++i) {
      const float ds = s[i] - base_s;
      const float dt = t[i] - base_t;
      w0[i] = exp_f32(ds * inv_t);
      w1[i] = exp_f32(dt * inv_t);
      w2[i] = w1[i] > 0.0f ? w1[i] * (dt - ds) : 0.0f;
    }
    add_to_lanes<kLanes>(w0, n, z_s_lanes);
    add_to_lanes<kLanes>(w1, n, z_t_lanes);
    if (!kJs) {
      add_to_lanes<kLanes>(w2, n, kl_lanes);
    }
  }
  const float z_t = sum_lanes<kLanes>(z_t_lanes);
  const float log_z_s = std::log(sum_lanes<kLanes>(z_s_lanes));
  const float log_z_t = std::log(z_t);

  float stat_a, stat_b, divergence;
  if (!kJs) {
    stat_b = sum_lanes<kLanes>(kl_lanes) / z_t;  // E_pt[d]
    stat_a = stat_b * inv_t - log_z_t + log_z_s;
    divergence = stat_a;
  } else {
    float a_lanes[kLanes] = {}, b_lanes[kLanes] = {};
    for (int64_t c0 = 0; c0 < a.cols; c0 += kChunk) {
      const int64_t n = std::min(kChunk, a.cols - c0);
      to_float(student + c0, n, s);
      to_float(teacher + c0, n, t);
      for (int64_t i = 0; i < n; ++i) {
        const float log_p_s = (s[i] - base_s) * inv_t - log_z_s;
        const float log_p_t = (t[i] - base_t) * inv_t - log_z_t;
        const float log_m = log_mixture(log_p_t, log_p_s);
        const float p_s = exp_f32(log_p_s);
        const float p_t = exp_f32(log_p_t);
        w0[i] = p_t > 0.0f ? p_t * (log_p_t - log_m) : 0.0f;
        w1[i] = p_s > 0.0f ? p_s * (log_p_s - log_m) : 0.0f;
      }
      add_to_lanes<kLanes>(w0, n, a_lanes);
      add_to_lanes<kLanes>(w1, n, b_lanes);
    }
    stat_a = 0.5f * sum_lanes<kLanes>(a_lanes);
    stat_b = 0.5f * sum_lanes<kLanes>(b_lanes);
    divergence = stat_a + stat_b;
  }

  float* stats = a.stats + row * kNumStats;
  stats[0] = m_s;
  stats[1] = log_z_s;
  stats[2] = m_t;
  stats[3] = log_z_t;
  stats[4] = stat_a;
  stats[5] = stat_b;
  const float weight = a.weight != nullptr ? a.weight[row] : 1.0f;
  a.row_loss[row] = divergence * a.temperature_squared * weight;
}

template <typename scalar_t, bool kJs>
DFKD_ALWAYS_INLINE void backward_row(const BackwardArgs& a, int64_t row) {
  const auto* student = static_cast<const scalar_t*>(a.student) + row * a.cols;
  const auto* teacher = static_cast<const scalar_t*>(a.teacher) + row * a.cols;
  const float* stats = a.stats + row * kNumStats;
  const float base_s = exponent_base(stats[0]);
  const float log_z_s = stats[1];
  const float base_t = exponent_base(stats[2]);
  const float log_z_t = stats[3];
  const float stat_a = stats[4];
  const float stat_b = stats[5];
  const float inv_t = a.inv_temperature;
  const float coefficient = a.grad_loss[a.grad_per_row ? row : 0] * a.grad_scale *
                            (a.weight != nullptr ? a.weight[row] : 1.0f);
  auto* grad_student =
      a.grad_student != nullptr ? static_cast<scalar_t*>(a.grad_student) + row * a.cols : nullptr;
  auto* grad_teacher =
      a.grad_teacher != nullptr ? static_cast<scalar_t*>(a.grad_teacher) + row * a.cols : nullptr;
  alignas(64) float s[kChunk], t[kChunk], g_s[kChunk], g_t[kChunk];

  for (int64_t c0 = 0; c0 < a.cols; c0 += kChunk) {
    const int64_t n = std::min(kChunk, a.cols - c0);
    to_float(student + c0, n, s);
    to_float(teacher + c0, n, t);
    for (int64_t i = 0; i < n; ++i) {
      const float ds = s[i] - base_s;
      const float dt = t[i] - base_t;
      const float log_p_s = ds * inv_t - log_z_s;
      const float log_p_t = dt * inv_t - log_z_t;
      const float p_s = exp_f32(log_p_s);
      const float p_t = exp_f32(log_p_t);
      if (!kJs) {
        g_s[i] = coefficient * (p_s - p_t);
        g_t[i] = p_t > 0.0f ? coefficient * p_t * ((dt - ds) - stat_b) * inv_t : 0.0f;
      } else {
        const float log_m = log_mixture(log_p_t, log_p_s);
        g_s[i] = p_s > 0.0f ? coefficient * p_s * (0.5f * (log_p_s - log_m) - stat_b) : 0.0f;
        g_t[i] = p_t > 0.0f ? coefficient * p_t * (0.5f * (log_p_t - log_m) - stat_a) : 0.0f;
      }
    }
    if (grad_student != nullptr) {
      from_float(g_s, n, grad_student + c0);
    }
    if (grad_teacher != nullptr) {
      from_float(g_t, n, grad_teacher + c0);
    }
  }
}

template <typename scalar_t>
DFKD_ALWAYS_INLINE void forward_rows(const ForwardArgs& a, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    a.js ? forward_row<scalar_t, true>(a, row) : forward_row<scalar_t, false>(a, row);
  }
}

template <typename scalar_t>
DFKD_ALWAYS_INLINE void backward_rows(const BackwardArgs& a, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    a.js ? backward_row<scalar_t, true>(a, row) : backward_row<scalar_t, false>(a, row);
  }
}

DFKD_DTYPE_CLONES(forward_kernels, ForwardArgs, forward_rows)
DFKD_DTYPE_CLONES(backward_kernels, BackwardArgs, backward_rows)

// ---------------------------------------------------------------------------------------------
// Torch side: checks, layout, reduction
// ---------------------------------------------------------------------------------------------

enum class Reduction { kNone, kSum, kMean, kBatchMean };

Reduction parse_reduction(c10::string_view reduction) {
  if (reduction == "none") return Reduction::kNone;
  if (reduction == "sum") return Reduction::kSum;
  if (reduction == "mean") return Reduction::kMean;
  TORCH_CHECK_VALUE(reduction == "batchmean",
                    "reduction must be one of none, sum, mean, batchmean; got ", reduction);
  return Reduction::kBatchMean;
}

bool parse_js(c10::string_view divergence) {
  TORCH_CHECK_VALUE(divergence == "kl" || divergence == "js",
                    "divergence must be 'kl' or 'js', got ", divergence);
  return divergence == "js";
}

// The factor that turns the sum of weighted row losses into the reduced loss.
double reduction_factor(Reduction reduction, int64_t rows, int64_t cols) {
  switch (reduction) {
    case Reduction::kNone:
    case Reduction::kSum:
      return 1.0;
    case Reduction::kMean:
      return rows * cols > 0 ? 1.0 / static_cast<double>(rows * cols) : std::nan("");
    case Reduction::kBatchMean:
      return rows > 0 ? 1.0 / static_cast<double>(rows) : std::nan("");
  }
  return 1.0;
}

// Contiguous logits of one dtype (float32 when student and teacher differ).
std::pair<at::Tensor, at::Tensor> prepare_logits(const at::Tensor& student,
                                                 const at::Tensor& teacher) {
  TORCH_CHECK_VALUE(student.dim() == 2 && teacher.sizes() == student.sizes(),
                    "student and teacher logits must be (rows, classes) of one shape, got ",
                    student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK_VALUE(student.device().is_cpu() && teacher.device().is_cpu(),
                    "the C++ kd_div kernels take CPU tensors");
  cpu::dtype_index(student, "student_logits");
  cpu::dtype_index(teacher, "teacher_logits");
  if (student.scalar_type() != teacher.scalar_type()) {
    return {student.to(at::kFloat).contiguous(), teacher.to(at::kFloat).contiguous()};
  }
  return {student.contiguous(), teacher.contiguous()};
}

at::Tensor prepare_weight(const std::optional<at::Tensor>& weight, int64_t rows) {
  if (!weight.has_value()) {
    return at::Tensor();
  }
  TORCH_CHECK_VALUE(weight->dim() == 1 && weight->size(0) == rows,
                    "weight must hold one value per row (", rows, "), got shape ",
                    weight->sizes());
  return weight->to(at::kFloat).contiguous();
}

void check_temperature(double temperature) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0,
                    "temperature must be a finite number > 0, got ", temperature);
}

int64_t grain_rows(int64_t cols) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, cols)); }

std::tuple<at::Tensor, at::Tensor> kd_div_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                              const std::optional<at::Tensor>& weight,
                                              double temperature, c10::string_view reduction,
                                              c10::string_view divergence) {
  check_temperature(temperature);
  const Reduction mode = parse_reduction(reduction);
  const bool js = parse_js(divergence);
  auto [s, t] = prepare_logits(student, teacher);
  const int64_t rows = s.size(0), cols = s.size(1);
  const at::Tensor w = prepare_weight(weight, rows);
  const auto float_options = s.options().dtype(at::kFloat);
  at::Tensor row_loss = at::empty({rows}, float_options);
  at::Tensor stats = at::empty({rows, kNumStats}, float_options);
  const ForwardArgs args{s.data_ptr(),
                         t.data_ptr(),
                         w.defined() ? w.data_ptr<float>() : nullptr,
                         row_loss.data_ptr<float>(),
                         stats.data_ptr<float>(),
                         rows,
                         cols,
                         static_cast<float>(1.0 / temperature),
                         static_cast<float>(temperature * temperature),
                         js};
  run_tasks(args, cpu::dtype_index(s, "logits"), rows, grain_rows(cols), forward_kernels);
  if (mode == Reduction::kNone) {
    return {row_loss, stats};
  }
  double total = 0.0;  // rows in order: deterministic
  const float* losses = row_loss.data_ptr<float>();
  for (int64_t row = 0; row < rows; ++row) {
    total += losses[row];
  }
  total *= reduction_factor(mode, rows, cols);
  return {at::scalar_tensor(total, float_options), stats};
}

std::tuple<at::Tensor, at::Tensor> kd_div_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
    const std::optional<at::Tensor>& weight, const at::Tensor& stats, double temperature,
    c10::string_view reduction, c10::string_view divergence, bool need_student,
    bool need_teacher) {
  check_temperature(temperature);
  const Reduction mode = parse_reduction(reduction);
  const bool js = parse_js(divergence);
  auto [s, t] = prepare_logits(student, teacher);
  const int64_t rows = s.size(0), cols = s.size(1);
  const at::Tensor w = prepare_weight(weight, rows);
  TORCH_CHECK_VALUE(stats.sizes() == at::IntArrayRef({rows, kNumStats}),
                    "stats must have shape (rows, 6), got ", stats.sizes());
  TORCH_CHECK_VALUE(mode == Reduction::kNone ? grad_loss.numel() == rows : grad_loss.numel() == 1,
                    "grad_loss must have the shape of the loss");
  const at::Tensor stats_c = stats.to(at::kFloat).contiguous();
  const at::Tensor grad_c = grad_loss.to(at::kFloat).contiguous();
  at::Tensor grad_s = need_student ? at::empty_like(s) : at::empty({0}, s.options());
  at::Tensor grad_t = need_teacher ? at::empty_like(t) : at::empty({0}, t.options());
  if (need_student || need_teacher) {
    const BackwardArgs args{
        s.data_ptr(),
        t.data_ptr(),
        w.defined() ? w.data_ptr<float>() : nullptr,
        stats_c.data_ptr<float>(),
        grad_c.data_ptr<float>(),
        mode == Reduction::kNone,
        need_student ? grad_s.data_ptr() : nullptr,
        need_teacher ? grad_t.data_ptr() : nullptr,
        rows,
        cols,
        static_cast<float>(1.0 / temperature),
        static_cast<float>(temperature * reduction_factor(mode, rows, cols)),
        js};
    run_tasks(args, cpu::dtype_index(s, "logits"), rows, grain_rows(cols), backward_kernels);
  }
  // Mixed-dtype inputs were computed in float32: hand each gradient back in its input's dtype.
  if (need_student && grad_s.scalar_type() != student.scalar_type()) {
    grad_s = grad_s.to(student.scalar_type());
  }
  if (need_teacher && grad_t.scalar_type() != teacher.scalar_type()) {
    grad_t = grad_t.to(teacher.scalar_type());
  }
  return {grad_s, grad_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(dfkd_fast, CPU, m) {
  m.impl("kd_div", &kd_div_cpu);
  m.impl("kd_div_backward", &kd_div_backward_cpu);
}

}  // namespace kd_div
}  // namespace dfkd_fast
