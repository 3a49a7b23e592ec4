// CPU kernels of dfkd_fast::max_pool2x2 and its backward: 2x2 max-pooling with stride 2 of a
// channels_last float32 tensor, with the position of each maximum in its window (0 to 3, row-major)
// as one byte.
//
// PyTorch's channels_last kernel vectorises over channels, which does little for LeNet-5's 3 or 6.
// Here each output value is a few compares and bit selects, with no branch on the data: which of
// four values is largest is a coin toss on real activations, and a mispredicted branch costs more
// than the compares. The choice is PyTorch's: the first maximum in row-major order, NaN winning
// (the last NaN).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common.h"

namespace dfkd_fast {
namespace max_pool {
namespace {

constexpr int64_t kGrainOutputs = 16384;

// b if take_b (0 or 1), else a, without a branch.
DFKD_ALWAYS_INLINE float select(float a, float b, uint32_t take_b) {
  uint32_t bits_a, bits_b;
  std::memcpy(&bits_a, &a, sizeof bits_a);
  std::memcpy(&bits_b, &b, sizeof bits_b);
  const uint32_t mask = 0u - take_b;
  const uint32_t bits = (bits_b & mask) | (bits_a & ~mask);
  float chosen;
  std::memcpy(&chosen, &bits, sizeof chosen);
  return chosen;
}

// Whether a later value replaces the maximum so far, as PyTorch's pooling decides.
DFKD_ALWAYS_INLINE uint32_t replaces(float later, float best) {
  return static_cast<uint32_t>(later > best) | static_cast<uint32_t>(later != later);
}

struct Shape {
  int64_t N, C, H, W, Ho, Wo;
};

struct ForwardArgs {
  Shape s;
  const float* x;  // (N, H, W, C)
  float* out;      // (N, Ho, Wo, C)
  uint8_t* where;  // (N, Ho, Wo, C)
};

struct BackwardArgs {
  Shape s;
  const float* grad_out;  // (N, Ho, Wo, C)
  const uint8_t* where;
  float* grad_x;  // (N, H, W, C)
};

// Up to kMaxSplitChannels channels, the kernels copy each block of windows' four corners into
// four arrays in output order, so that the compares run on contiguous vectors; per window the
// copies are four runs of C floats, which code compiled for that C moves in a few loads. With
// more channels the loops over channels vectorise as they stand.
constexpr int kMaxSplitChannels = 16;
constexpr int64_t kCornerFloats = 512;  // floats per corner array of a block: 8 KiB in all

// Maxima and positions of `count` outputs (one channel of one window each), whose window corners
// lie in four arrays in output order.
DFKD_ALWAYS_INLINE void pool_corners(const float* __restrict top_left,
                                     const float* __restrict top_right,
                                     const float* __restrict bottom_left,
                                     const float* __restrict bottom_right, int64_t count,
                                     float* __restrict out, uint8_t* __restrict where) {
  for (int64_t i = 0; i < count; ++i) {
    const float p = top_left[i], q = top_right[i], u = bottom_left[i], v = bottom_right[i];
    const uint32_t right_of_top = replaces(q, p), right_of_bottom = replaces(v, u);
    const float top_max = select(p, q, right_of_top), bottom_max = select(u, v, right_of_bottom);
    const uint32_t bottom_row = replaces(bottom_max, top_max);
    out[i] = select(top_max, bottom_max, bottom_row);
    where[i] = static_cast<uint8_t>(bottom_row * (2 + right_of_bottom) +
                                    (1 - bottom_row) * right_of_top);
  }
}

// Output rows [begin, end) of the N * Ho, for tensors of C channels.
template <int C>
DFKD_ALWAYS_INLINE void pool_rows_split(const ForwardArgs& a, int64_t begin, int64_t end) {
  constexpr int64_t kWindows = kCornerFloats / C;
  float corners[4][kWindows * C];
  const int64_t row = a.s.W * C, out_row = a.s.Wo * C;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / a.s.Ho, y = r % a.s.Ho;
    const float* top = a.x + (n * a.s.H + 2 * y) * row;
    const float* bottom = top + row;
    for (int64_t first = 0; first < a.s.Wo; first += kWindows) {
      const int64_t windows = std::min(kWindows, a.s.Wo - first);
      for (int64_t x = 0; x < windows; ++x) {
        const int64_t left = 2 * (first + x) * C;
        std::memcpy(corners[0] + x * C, top + left, sizeof(float) * C);
        std::memcpy(corners[1] + x * C, top + left + C, sizeof(float) * C);
        std::memcpy(corners[2] + x * C, bottom + left, sizeof(float) * C);
        std::memcpy(corners[3] + x * C, bottom + left + C, sizeof(float) * C);
      }
      const int64_t offset = r * out_row + first * C;
      pool_corners(corners[0], corners[1], corners[2], corners[3], windows * C,
                   a.out + offset, a.where + offset);
    }
  }
}

DFKD_ALWAYS_INLINE void pool_rows_by_channel(const ForwardArgs& a, int64_t begin, int64_t end) {
  const int64_t C = a.s.C, row = a.s.W * C, out_row = a.s.Wo * C;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / a.s.Ho, y = r % a.s.Ho;
    const float* top = a.x + (n * a.s.H + 2 * y) * row;
    const float* bottom = top + row;
    for (int64_t x = 0; x < a.s.Wo; ++x) {
      const int64_t left = 2 * x * C, offset = r * out_row + x * C;
      pool_corners(top + left, top + left + C, bottom + left, bottom + left + C, C,
                   a.out + offset, a.where + offset);
    }
  }
}

template <int C>
DFKD_ALWAYS_INLINE void pool_rows_for(const ForwardArgs& a, int64_t begin, int64_t end) {
  if constexpr (C > kMaxSplitChannels) {
    pool_rows_by_channel(a, begin, end);
  } else if (a.s.C == C) {
    pool_rows_split<C>(a, begin, end);
  } else {
    pool_rows_for<C + 1>(a, begin, end);
  }
}

DFKD_CPU_CLONES void pool_rows(const ForwardArgs& a, int64_t begin, int64_t end) {
  pool_rows_for<1>(a, begin, end);
}

// Each window's gradient at its recorded corner and zero at the other three, in output order.
DFKD_ALWAYS_INLINE void unpool_corners(const float* __restrict grad_out,
                                       const uint8_t* __restrict where, int64_t count,
                                       float* __restrict top_left, float* __restrict top_right,
                                       float* __restrict bottom_left,
                                       float* __restrict bottom_right) {
  for (int64_t i = 0; i < count; ++i) {
    const float g = grad_out[i];
    const uint32_t w = where[i];
    top_left[i] = select(0.0f, g, w == 0);
    top_right[i] = select(0.0f, g, w == 1);
    bottom_left[i] = select(0.0f, g, w == 2);
    bottom_right[i] = select(0.0f, g, w == 3);
  }
}

// The input positions of rows [2y, 2y + 2) that no window covers (a last odd column), and the
// third row of a last odd row, are zeroed.
DFKD_ALWAYS_INLINE void zero_uncovered(const Shape& s, int64_t y, float* grad_x) {
  const int64_t row = s.W * s.C, covered = 2 * s.Wo * s.C;
  if (covered < row) {
    std::memset(grad_x + covered, 0, sizeof(float) * (row - covered));
    std::memset(grad_x + row + covered, 0, sizeof(float) * (row - covered));
  }
  if (y == s.Ho - 1 && s.H % 2 == 1) {
    std::memset(grad_x + 2 * row, 0, sizeof(float) * row);
  }
}

// Output rows [begin, end) of the N * Ho, for tensors of C channels: each window's four input
// positions are written, and the rest of its rows zeroed.
template <int C>
DFKD_ALWAYS_INLINE void unpool_rows_split(const BackwardArgs& a, int64_t begin, int64_t end) {
  constexpr int64_t kWindows = kCornerFloats / C;
  float corners[4][kWindows * C];
  const int64_t row = a.s.W * C, out_row = a.s.Wo * C;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / a.s.Ho, y = r % a.s.Ho;
    float* top = a.grad_x + (n * a.s.H + 2 * y) * row;
    float* bottom = top + row;
    for (int64_t first = 0; first < a.s.Wo; first += kWindows) {
      const int64_t windows = std::min(kWindows, a.s.Wo - first);
      const int64_t offset = r * out_row + first * C;
      unpool_corners(a.grad_out + offset, a.where + offset, windows * C, corners[0], corners[1],
                     corners[2], corners[3]);
      for (int64_t x = 0; x < windows; ++x) {
        const int64_t left = 2 * (first + x) * C;
        std::memcpy(top + left, corners[0] + x * C, sizeof(float) * C);
        std::memcpy(top + left + C, corners[1] + x * C, sizeof(float) * C);
        std::memcpy(bottom + left, corners[2] + x * C, sizeof(float) * C);
        std::memcpy(bottom + left + C, corners[3] + x * C, sizeof(float) * C);
      }
    }
    zero_uncovered(a.s, y, top);
  }
}

DFKD_ALWAYS_INLINE void unpool_rows_by_channel(const BackwardArgs& a, int64_t begin,
                                               int64_t end) {
  const int64_t C = a.s.C, row = a.s.W * C, out_row = a.s.Wo * C;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / a.s.Ho, y = r % a.s.Ho;
    float* top = a.grad_x + (n * a.s.H + 2 * y) * row;
    float* bottom = top + row;
    for (int64_t x = 0; x < a.s.Wo; ++x) {
      const int64_t left = 2 * x * C, offset = r * out_row + x * C;
      unpool_corners(a.grad_out + offset, a.where + offset, C, top + left, top + left + C,
                     bottom + left, bottom + left + C);
    }
    zero_uncovered(a.s, y, top);
  }
}

template <int C>
DFKD_ALWAYS_INLINE void unpool_rows_for(const BackwardArgs& a, int64_t begin, int64_t end) {
  if constexpr (C > kMaxSplitChannels) {
    unpool_rows_by_channel(a, begin, end);
  } else if (a.s.C == C) {
    unpool_rows_split<C>(a, begin, end);
  } else {
    unpool_rows_for<C + 1>(a, begin, end);
  }
}

DFKD_CPU_CLONES void unpool_rows(const BackwardArgs& a, int64_t begin, int64_t end) {
  unpool_rows_for<1>(a, begin, end);
}

Shape shape_of(const at::Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  return {N, C, H, W, H / 2, W / 2};
}

int64_t grain(int64_t outputs_per_task) {
  return std::max<int64_t>(1, kGrainOutputs / std::max<int64_t>(1, outputs_per_task));
}

std::tuple<at::Tensor, at::Tensor> max_pool2x2_cpu(const at::Tensor& x_in) {
  TORCH_CHECK_VALUE(x_in.dim() == 4 && x_in.size(2) >= 2 && x_in.size(3) >= 2,
                    "x must have shape (N, C, H, W) with H, W >= 2, got ", x_in.sizes());
  TORCH_CHECK_TYPE(x_in.scalar_type() == at::kFloat, "max_pool2x2 takes float32 x, got ",
                   x_in.scalar_type());
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const Shape s = shape_of(x);
  const auto layout = at::MemoryFormat::ChannelsLast;
  at::Tensor out = at::empty({s.N, s.C, s.Ho, s.Wo}, x.options().memory_format(layout));
  at::Tensor where = at::empty({s.N, s.C, s.Ho, s.Wo},
                               x.options().dtype(at::kByte).memory_format(layout));
  if (out.numel() == 0) {
    return {out, where};
  }
  const ForwardArgs args{s, x.data_ptr<float>(), out.data_ptr<float>(),
                         where.data_ptr<uint8_t>()};
  at::parallel_for(0, s.N * s.Ho, grain(s.Wo * s.C),
                   [&](int64_t begin, int64_t end) { pool_rows(args, begin, end); });
  return {out, where};
}

at::Tensor max_pool2x2_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& where_in,
                                    at::IntArrayRef input_size) {
  TORCH_CHECK_VALUE(input_size.size() == 4, "input_size must be (N, C, H, W), got ", input_size);
  const Shape s{input_size[0], input_size[1], input_size[2], input_size[3], input_size[2] / 2,
                input_size[3] / 2};
  const std::vector<int64_t> pooled{s.N, s.C, s.Ho, s.Wo};
  TORCH_CHECK_VALUE(grad_out_in.sizes() == at::IntArrayRef(pooled) &&
                        where_in.sizes() == at::IntArrayRef(pooled),
                    "grad_output and indices must have shape ", at::IntArrayRef(pooled),
                    ", got ", grad_out_in.sizes(), " and ", where_in.sizes());
  TORCH_CHECK_TYPE(grad_out_in.scalar_type() == at::kFloat && where_in.scalar_type() == at::kByte,
                   "grad_output must be float32 and indices uint8, got ",
                   grad_out_in.scalar_type(), " and ", where_in.scalar_type());
  const auto layout = at::MemoryFormat::ChannelsLast;
  const at::Tensor grad_out = grad_out_in.contiguous(layout);
  const at::Tensor where = where_in.contiguous(layout);
  at::Tensor grad_x = at::empty({s.N, s.C, s.H, s.W}, grad_out.options().memory_format(layout));
  if (grad_x.numel() == 0) {
    return grad_x;
  }
  const BackwardArgs args{s, grad_out.data_ptr<float>(), where.data_ptr<uint8_t>(),
                          grad_x.data_ptr<float>()};
  at::parallel_for(0, s.N * s.Ho, grain(2 * s.W * s.C),
                   [&](int64_t begin, int64_t end) { unpool_rows(args, begin, end); });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(dfkd_fast, CPU, m) {
  m.impl("max_pool2x2", &max_pool2x2_cpu);
  m.impl("max_pool2x2_backward", &max_pool2x2_backward_cpu);
}

}  // namespace max_pool
}  // namespace dfkd_fast
