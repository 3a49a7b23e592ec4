// CPU kernels of dfkd_fast::max_pool2x2 and its backward: 2x2 max-pooling with stride 2 of a
// channels_last float32 or bfloat16 tensor, with the position of each maximum in its window (0 to
// 3, row-major) as one byte. bfloat16 values are compared as the float32 values they widen to.
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
#include <type_traits>

#include "common.h"

namespace dfkd_fast {
namespace max_pool {
namespace {

constexpr int64_t kGrainOutputs = 16384;

// A bfloat16 as its bits: the kernels only widen, narrow and move values.
using BFloat16Bits = uint16_t;

template <typename T>
DFKD_ALWAYS_INLINE float widened(T value) {
  if constexpr (std::is_same_v<T, float>) {
    return value;
  } else {
    const uint32_t bits = static_cast<uint32_t>(value) << 16;
    float wide;
    std::memcpy(&wide, &bits, sizeof wide);
    return wide;
  }
}

// `value` as a T; exact, as `value` is a T widened (a maximum of T values).
template <typename T>
DFKD_ALWAYS_INLINE T narrowed(float value) {
  if constexpr (std::is_same_v<T, float>) {
    return value;
  } else {
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof bits);
    return static_cast<T>(bits >> 16);
  }
}

// b if take_b (0 or 1), else a, without a branch.
template <typename T>
DFKD_ALWAYS_INLINE T select(T a, T b, uint32_t take_b) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>;
  Bits bits_a, bits_b;
  std::memcpy(&bits_a, &a, sizeof bits_a);
  std::memcpy(&bits_b, &b, sizeof bits_b);
  const Bits mask = static_cast<Bits>(Bits{0} - static_cast<Bits>(take_b));
  const Bits bits = static_cast<Bits>((bits_b & mask) | (bits_a & ~mask));
  T chosen;
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

template <typename T>
struct ForwardArgs {
  Shape s;
  const T* x;      // (N, H, W, C)
  T* out;          // (N, Ho, Wo, C)
  uint8_t* where;  // (N, Ho, Wo, C)
};

template <typename T>
struct BackwardArgs {
  Shape s;
  const T* grad_out;  // (N, Ho, Wo, C)
  const uint8_t* where;
  T* grad_x;  // (N, H, W, C)
};

// Up to kMaxSplitChannels channels, the kernels copy each block of windows' four corners into
// four arrays in output order (the forward widening bfloat16 to float32), so that the compares
// run on contiguous vectors; per window the copies are four runs of C values, which code compiled
// for that C moves in a few loads. With more channels the loops over channels vectorise as they
// stand.
constexpr int kMaxSplitChannels = 16;
constexpr int64_t kCornerValues = 512;  // values per corner array of a block

// Maxima and positions of `count` outputs (one channel of one window each), whose window corners
// lie in four arrays in output order.
template <typename In, typename Out>
DFKD_ALWAYS_INLINE void pool_corners(const In* __restrict top_left, const In* __restrict top_right,
                                     const In* __restrict bottom_left,
                                     const In* __restrict bottom_right, int64_t count,
                                     Out* __restrict out, uint8_t* __restrict where) {
  for (int64_t i = 0; i < count; ++i) {
    const float p = widened(top_left[i]), q = widened(top_right[i]);
    const float u = widened(bottom_left[i]), v = widened(bottom_right[i]);
    const uint32_t right_of_top = replaces(q, p), right_of_bottom = replaces(v, u);
    const float top_max = select(p, q, right_of_top), bottom_max = select(u, v, right_of_bottom);
    const uint32_t bottom_row = replaces(bottom_max, top_max);
    out[i] = narrowed<Out>(select(top_max, bottom_max, bottom_row));
    where[i] = static_cast<uint8_t>(bottom_row * (2 + right_of_bottom) +
                                    (1 - bottom_row) * right_of_top);
  }
}

// The C values at `from` as float32 at `to`.
template <int C, typename T>
DFKD_ALWAYS_INLINE void copy_widened(float* __restrict to, const T* __restrict from) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(to, from, sizeof(float) * C);
  } else {
    for (int c = 0; c < C; ++c) {
      to[c] = widened(from[c]);
    }
  }
}

// Output rows [begin, end) of the N * Ho, for tensors of C channels.
template <typename T, int C>
DFKD_ALWAYS_INLINE void pool_rows_split(const ForwardArgs<T>& a, int64_t begin, int64_t end) {
  constexpr int64_t kWindows = kCornerValues / C;
  float corners[4][kWindows * C];
  const int64_t row = a.s.W * C, out_row = a.s.Wo * C;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / a.s.Ho, y = r % a.s.Ho;
    const T* top = a.x + (n * a.s.H + 2 * y) * row;
    const T* bottom = top + row;
    for (int64_t first = 0; first < a.s.Wo; first += kWindows) {
      const int64_t windows = std::min(kWindows, a.s.Wo - first);
      for (int64_t x = 0; x < windows; ++x) {
        const int64_t left = 2 * (first + x) * C;
        copy_widened<C>(corners[0] + x * C, top + left);
        copy_widened<C>(corners[1] + x * C, top + left + C);
        copy_widened<C>(corners[2] + x * C, bottom + left);
        copy_widened<C>(corners[3] + x * C, bottom + left + C);
      }
      const int64_t offset = r * out_row + first * C;
      pool_corners(corners[0], corners[1], corners[2], corners[3], windows * C,
                   a.out + offset, a.where + offset);
    }
  }
}

template <typename T>
DFKD_ALWAYS_INLINE void pool_rows_by_channel(const ForwardArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t C = a.s.C, row = a.s.W * C, out_row = a.s.Wo * C;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / a.s.Ho, y = r % a.s.Ho;
    const T* top = a.x + (n * a.s.H + 2 * y) * row;
    const T* bottom = top + row;
    for (int64_t x = 0; x < a.s.Wo; ++x) {
      const int64_t left = 2 * x * C, offset = r * out_row + x * C;
      pool_corners(top + left, top + left + C, bottom + left, bottom + left + C, C,
                   a.out + offset, a.where + offset);
    }
  }
}

template <typename T, int C>
DFKD_ALWAYS_INLINE void pool_rows_for(const ForwardArgs<T>& a, int64_t begin, int64_t end) {
  if constexpr (C > kMaxSplitChannels) {
    pool_rows_by_channel(a, begin, end);
  } else if (a.s.C == C) {
    pool_rows_split<T, C>(a, begin, end);
  } else {
    pool_rows_for<T, C + 1>(a, begin, end);
  }
}

// Each window's gradient at its recorded corner and zero at the other three, in output order.
template <typename T>
DFKD_ALWAYS_INLINE void unpool_corners(const T* __restrict grad_out,
                                       const uint8_t* __restrict where, int64_t count,
                                       T* __restrict top_left, T* __restrict top_right,
                                       T* __restrict bottom_left, T* __restrict bottom_right) {
  const T zero{0};  // +0.0 in either type's bits
  for (int64_t i = 0; i < count; ++i) {
    const T g = grad_out[i];
    const uint32_t w = where[i];
    top_left[i] = select(zero, g, w == 0);
    top_right[i] = select(zero, g, w == 1);
    bottom_left[i] = select(zero, g, w == 2);
    bottom_right[i] = select(zero, g, w == 3);
  }
}

// The input positions of rows [2y, 2y + 2) that no window covers (a last odd column), and the
// third row of a last odd row, are zeroed.
template <typename T>
DFKD_ALWAYS_INLINE void zero_uncovered(const Shape& s, int64_t y, T* grad_x) {
  const int64_t row = s.W * s.C, covered = 2 * s.Wo * s.C;
  if (covered < row) {
    std::memset(grad_x + covered, 0, sizeof(T) * (row - covered));
    std::memset(grad_x + row + covered, 0, sizeof(T) * (row - covered));
  }
  if (y == s.Ho - 1 && s.H % 2 == 1) {
    std::memset(grad_x + 2 * row, 0, sizeof(T) * row);
  }
}

// Output rows [begin, end) of the N * Ho, for tensors of C channels: each window's four input
// positions are written, and the rest of its rows zeroed.
template <typename T, int C>
DFKD_ALWAYS_INLINE void unpool_rows_split(const BackwardArgs<T>& a, int64_t begin, int64_t end) {
  constexpr int64_t kWindows = kCornerValues / C;
  T corners[4][kWindows * C];
  const int64_t row = a.s.W * C, out_row = a.s.Wo * C;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / a.s.Ho, y = r % a.s.Ho;
    T* top = a.grad_x + (n * a.s.H + 2 * y) * row;
    T* bottom = top + row;
    for (int64_t first = 0; first < a.s.Wo; first += kWindows) {
      const int64_t windows = std::min(kWindows, a.s.Wo - first);
      const int64_t offset = r * out_row + first * C;
      unpool_corners(a.grad_out + offset, a.where + offset, windows * C, corners[0], corners[1],
                     corners[2], corners[3]);
      for (int64_t x = 0; x < windows; ++x) {
        const int64_t left = 2 * (first + x) * C;
        std::memcpy(top + left, corners[0] + x * C, sizeof(T) * C);
        std::memcpy(top + left + C, corners[1] + x * C, sizeof(T) * C);
        std::memcpy(bottom + left, corners[2] + x * C, sizeof(T) * C);
        std::memcpy(bottom + left + C, corners[3] + x * C, sizeof(T) * C);
      }
    }
    zero_uncovered(a.s, y, top);
  }
}

template <typename T>
DFKD_ALWAYS_INLINE void unpool_rows_by_channel(const BackwardArgs<T>& a, int64_t begin,
                                               int64_t end) {
  const int64_t C = a.s.C, row = a.s.W * C, out_row = a.s.Wo * C;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / a.s.Ho, y = r % a.s.Ho;
    T* top = a.grad_x + (n * a.s.H + 2 * y) * row;
    T* bottom = top + row;
    for (int64_t x = 0; x < a.s.Wo; ++x) {
      const int64_t left = 2 * x * C, offset = r * out_row + x * C;
      unpool_corners(a.grad_out + offset, a.where + offset, C, top + left, top + left + C,
                     bottom + left, bottom + left + C);
    }
    zero_uncovered(a.s, y, top);
  }
}

template <typename T, int C>
DFKD_ALWAYS_INLINE void unpool_rows_for(const BackwardArgs<T>& a, int64_t begin, int64_t end) {
  if constexpr (C > kMaxSplitChannels) {
    unpool_rows_by_channel(a, begin, end);
  } else if (a.s.C == C) {
    unpool_rows_split<T, C>(a, begin, end);
  } else {
    unpool_rows_for<T, C + 1>(a, begin, end);
  }
}

DFKD_CPU_CLONES void pool_rows_float(const ForwardArgs<float>& a, int64_t begin, int64_t end) {
  pool_rows_for<float, 1>(a, begin, end);
}

DFKD_CPU_CLONES void pool_rows_bfloat16(const ForwardArgs<BFloat16Bits>& a, int64_t begin,
                                        int64_t end) {
  pool_rows_for<BFloat16Bits, 1>(a, begin, end);
}

DFKD_CPU_CLONES void unpool_rows_float(const BackwardArgs<float>& a, int64_t begin, int64_t end) {
  unpool_rows_for<float, 1>(a, begin, end);
}

DFKD_CPU_CLONES void unpool_rows_bfloat16(const BackwardArgs<BFloat16Bits>& a, int64_t begin,
                                          int64_t end) {
  unpool_rows_for<BFloat16Bits, 1>(a, begin, end);
}

Shape shape_of(const at::Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  return {N, C, H, W, H / 2, W / 2};
}

int64_t grain(int64_t outputs_per_task) {
  return std::max<int64_t>(1, kGrainOutputs / std::max<int64_t>(1, outputs_per_task));
}

// The tensor's values as the kernels' element type.
template <typename T>
T* values(const at::Tensor& tensor) {
  if constexpr (std::is_same_v<T, float>) {
    return tensor.data_ptr<float>();
  } else {
    return reinterpret_cast<T*>(tensor.data_ptr<at::BFloat16>());
  }
}

bool kernel_dtype(at::ScalarType dtype) { return dtype == at::kFloat || dtype == at::kBFloat16; }

template <typename T>
void pool(const at::Tensor& x, const at::Tensor& out, const at::Tensor& where,
          void (*rows)(const ForwardArgs<T>&, int64_t, int64_t)) {
  const Shape s = shape_of(x);
  const ForwardArgs<T> args{s, values<T>(x), values<T>(out), where.data_ptr<uint8_t>()};
  at::parallel_for(0, s.N * s.Ho, grain(s.Wo * s.C),
                   [&](int64_t begin, int64_t end) { rows(args, begin, end); });
}

template <typename T>
void unpool(const Shape& s, const at::Tensor& grad_out, const at::Tensor& where,
            const at::Tensor& grad_x, void (*rows)(const BackwardArgs<T>&, int64_t, int64_t)) {
  const BackwardArgs<T> args{s, values<T>(grad_out), where.data_ptr<uint8_t>(),
                             values<T>(grad_x)};
  at::parallel_for(0, s.N * s.Ho, grain(2 * s.W * s.C),
                   [&](int64_t begin, int64_t end) { rows(args, begin, end); });
}

std::tuple<at::Tensor, at::Tensor> max_pool2x2_cpu(const at::Tensor& x_in) {
  TORCH_CHECK_VALUE(x_in.dim() == 4 && x_in.size(2) >= 2 && x_in.size(3) >= 2,
                    "x must have shape (N, C, H, W) with H, W >= 2, got ", x_in.sizes());
  TORCH_CHECK_TYPE(kernel_dtype(x_in.scalar_type()),
                   "max_pool2x2 takes float32 or bfloat16 x, got ", x_in.scalar_type());
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const Shape s = shape_of(x);
  const auto layout = at::MemoryFormat::ChannelsLast;
  at::Tensor out = at::empty({s.N, s.C, s.Ho, s.Wo}, x.options().memory_format(layout));
  at::Tensor where = at::empty({s.N, s.C, s.Ho, s.Wo},
                               x.options().dtype(at::kByte).memory_format(layout));
  if (out.numel() == 0) {
    return {out, where};
  }
  if (x.scalar_type() == at::kFloat) {
    pool<float>(x, out, where, pool_rows_float);
  } else {
    pool<BFloat16Bits>(x, out, where, pool_rows_bfloat16);
  }
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
  TORCH_CHECK_TYPE(kernel_dtype(grad_out_in.scalar_type()) && where_in.scalar_type() == at::kByte,
                   "grad_output must be float32 or bfloat16 and indices uint8, got ",
                   grad_out_in.scalar_type(), " and ", where_in.scalar_type());
  const auto layout = at::MemoryFormat::ChannelsLast;
  const at::Tensor grad_out = grad_out_in.contiguous(layout);
  const at::Tensor where = where_in.contiguous(layout);
  at::Tensor grad_x = at::empty({s.N, s.C, s.H, s.W}, grad_out.options().memory_format(layout));
  if (grad_x.numel() == 0) {
    return grad_x;
  }
  if (grad_out.scalar_type() == at::kFloat) {
    unpool<float>(s, grad_out, where, grad_x, unpool_rows_float);
  } else {
    unpool<BFloat16Bits>(s, grad_out, where, grad_x, unpool_rows_bfloat16);
  }
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(dfkd_fast, CPU, m) {
  m.impl("max_pool2x2", &max_pool2x2_cpu);
  m.impl("max_pool2x2_backward", &max_pool2x2_backward_cpu);
}

}  // namespace max_pool
}  // namespace dfkd_fast
