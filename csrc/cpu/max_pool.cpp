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

// Output rows [begin, end) of the N * Ho.
DFKD_CPU_CLONES void pool_rows(const ForwardArgs& a, int64_t begin, int64_t end) {
  const int64_t C = a.s.C, row = a.s.W * C, out_row = a.s.Wo * C;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / a.s.Ho, y = r % a.s.Ho;
    const float* __restrict top = a.x + (n * a.s.H + 2 * y) * row;
    const float* __restrict bottom = top + row;
    float* __restrict out = a.out + r * out_row;
    uint8_t* __restrict where = a.where + r * out_row;
    for (int64_t x = 0; x < a.s.Wo; ++x) {
      const int64_t left = 2 * x * C;
      for (int64_t c = 0; c < C; ++c) {
        const float p = top[left + c], q = top[left + C + c];
        const float u = bottom[left + c], v = bottom[left + C + c];
        const uint32_t top_right = replaces(q, p), bottom_right = replaces(v, u);
        const float top_max = select(p, q, top_right), bottom_max = select(u, v, bottom_right);
        const uint32_t bottom_row = replaces(bottom_max, top_max);
        out[x * C + c] = select(top_max, bottom_max, bottom_row);
        where[x * C + c] = static_cast<uint8_t>(bottom_row * (2 + bottom_right) +
                                                (1 - bottom_row) * top_right);
      }
    }
  }
}

// Output rows [begin, end) of the N * Ho: their two input rows (three for a last odd row) are
// zeroed, then each window's maximum gets the gradient.
DFKD_CPU_CLONES void unpool_rows(const BackwardArgs& a, int64_t begin, int64_t end) {
  const int64_t C = a.s.C, row = a.s.W * C, out_row = a.s.Wo * C;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / a.s.Ho, y = r % a.s.Ho;
    float* __restrict grad_x = a.grad_x + (n * a.s.H + 2 * y) * row;
    const bool last_odd_row = y == a.s.Ho - 1 && a.s.H % 2 == 1;
    std::memset(grad_x, 0, sizeof(float) * row * (last_odd_row ? 3 : 2));
    const float* __restrict grad_out = a.grad_out + r * out_row;
    const uint8_t* __restrict where = a.where + r * out_row;
    for (int64_t x = 0; x < a.s.Wo; ++x) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t w = where[x * C + c];
        grad_x[(w >> 1) * row + (2 * x + (w & 1)) * C + c] = grad_out[x * C + c];
      }
    }
  }
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
