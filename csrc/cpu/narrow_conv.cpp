// CPU kernel of dfkd_fast::narrow_conv2d: a stride-1 convolution with few output channels.
//
// oneDNN computes every convolution in blocks of 8 or 16 output channels, so a convolution to one
// channel (an image generator's last layer; the input gradient of a network's first layer on a
// grey image) costs what one to eight channels would. Here each output value is a dot product:
// in channels_last, the kernel's row i meets one contiguous run of KW * C input values, so
//     out[n, y, x, o] = sum_i dot(x[n, y + i - ph, x - pw : x - pw + KW, :], w[o, i, :, :]).
// A block of output pixels of one row and up to four output channels is computed together, each
// input vector loaded once for all of the block's channels, in independent accumulators. Every
// output value is summed in the same order whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "common.h"

namespace dfkd_fast {
namespace narrow_conv {
namespace {

constexpr int kLanes = 8;
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));
constexpr int64_t kMaxBlockChannels = 4;
constexpr int64_t kGrainMultiplyAdds = 1 << 16;

struct Args {
  const float* x;       // (N, H, W, C)
  const float* weight;  // (O, KH, KW, C)
  const float* bias;    // (O,) or null
  float* out;           // (N, Ho, Wo, O)
  int64_t N, C, H, W, O, KH, KW, pad_h, pad_w, Ho, Wo;
};

DFKD_ALWAYS_INLINE Lanes load(const float* p) {
  Lanes v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

DFKD_ALWAYS_INLINE float lane_sum(Lanes v) {
  float total = 0.0f;
  for (int lane = 0; lane < kLanes; ++lane) {
    total += v[lane];
  }
  return total;
}

// Output pixels xo .. xo + kPixels - 1 of row (n, y), channels o .. o + kChannels - 1, whose
// windows all cover kernel columns [jlo, jhi) and rows [ilo, ihi).
template <int kChannels, int kPixels>
DFKD_ALWAYS_INLINE void pixel_block(const Args& a, int64_t n, int64_t y, int64_t o, int64_t xo,
                                    int64_t ilo, int64_t ihi, int64_t jlo, int64_t jhi) {
  Lanes acc[kChannels][kPixels] = {};
  float tail[kChannels][kPixels] = {};
  const int64_t run = (jhi - jlo) * a.C;
  const int64_t vector_end = run / kLanes * kLanes;
  for (int64_t i = ilo; i < ihi; ++i) {
    const float* in = a.x + ((n * a.H + y + i - a.pad_h) * a.W + xo - a.pad_w + jlo) * a.C;
    const float* w[kChannels];
    for (int c = 0; c < kChannels; ++c) {
      w[c] = a.weight + (((o + c) * a.KH + i) * a.KW + jlo) * a.C;
    }
    for (int64_t k = 0; k < vector_end; k += kLanes) {
      Lanes values[kPixels];
      for (int p = 0; p < kPixels; ++p) {
        values[p] = load(in + p * a.C + k);
      }
      for (int c = 0; c < kChannels; ++c) {
        const Lanes wv = load(w[c] + k);
        for (int p = 0; p < kPixels; ++p) {
          acc[c][p] += values[p] * wv;
        }
      }
    }
    for (int64_t k = vector_end; k < run; ++k) {
      for (int c = 0; c < kChannels; ++c) {
        for (int p = 0; p < kPixels; ++p) {
          tail[c][p] += in[p * a.C + k] * w[c][k];
        }
      }
    }
  }
  float* out = a.out + ((n * a.Ho + y) * a.Wo + xo) * a.O + o;
  for (int c = 0; c < kChannels; ++c) {
    const float bias = a.bias ? a.bias[o + c] : 0.0f;
    for (int p = 0; p < kPixels; ++p) {
      out[p * a.O + c] = (lane_sum(acc[c][p]) + tail[c][p]) + bias;
    }
  }
}

// Row (n, y) for channels o .. o + kChannels - 1: border pixels one at a time (their windows are
// clipped), the interior in blocks of kPixels.
template <int kChannels, int kPixels>
DFKD_ALWAYS_INLINE void row_channels(const Args& a, int64_t n, int64_t y, int64_t o) {
  const int64_t ilo = std::max<int64_t>(0, a.pad_h - y);
  const int64_t ihi = std::max(ilo, std::min<int64_t>(a.KH, a.H + a.pad_h - y));
  const int64_t interior_end = std::min(a.Wo, a.W + a.pad_w - a.KW + 1);
  auto clipped = [&](int64_t xo) {
    const int64_t jlo = std::max<int64_t>(0, a.pad_w - xo);
    const int64_t jhi = std::max(jlo, std::min<int64_t>(a.KW, a.W + a.pad_w - xo));
    pixel_block<kChannels, 1>(a, n, y, o, xo, ilo, ihi, jlo, jhi);
  };
  int64_t xo = 0;
  for (; xo < std::min(a.pad_w, a.Wo); ++xo) {
    clipped(xo);
  }
  for (; xo + kPixels <= interior_end; xo += kPixels) {
    pixel_block<kChannels, kPixels>(a, n, y, o, xo, ilo, ihi, 0, a.KW);
  }
  for (; xo < a.Wo; ++xo) {
    clipped(xo);
  }
}

// Rows [begin, end) of the (N * Ho) output rows, all channels. The pixel block per channel block
// keeps its accumulators, one input vector per pixel and one weight vector in 16 registers.
DFKD_CPU_CLONES void convolve_rows(const Args& a, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / a.Ho, y = row % a.Ho;
    for (int64_t o = 0; o < a.O; o += kMaxBlockChannels) {
      switch (std::min(kMaxBlockChannels, a.O - o)) {
        case 1:
          row_channels<1, 8>(a, n, y, o);
          break;
        case 2:
          row_channels<2, 4>(a, n, y, o);
          break;
        case 3:
          row_channels<3, 3>(a, n, y, o);
          break;
        default:
          row_channels<4, 2>(a, n, y, o);
          break;
      }
    }
  }
}

at::Tensor narrow_conv2d_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                             const std::optional<at::Tensor>& bias_in, at::IntArrayRef padding) {
  TORCH_CHECK_VALUE(x_in.dim() == 4, "x must have shape (N, C, H, W), got ", x_in.sizes());
  TORCH_CHECK_VALUE(weight_in.dim() == 4 && weight_in.size(1) == x_in.size(1),
                    "weight must have shape (O, ", x_in.size(1), ", KH, KW), got ",
                    weight_in.sizes());
  TORCH_CHECK_TYPE(x_in.scalar_type() == at::kFloat && weight_in.scalar_type() == at::kFloat,
                   "narrow_conv2d takes float32 x and weight, got ", x_in.scalar_type(), " and ",
                   weight_in.scalar_type());
  TORCH_CHECK_VALUE(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0,
                    "padding must be two non-negative values, got ", padding);
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t O = weight_in.size(0), KH = weight_in.size(2), KW = weight_in.size(3);
  const int64_t Ho = H + 2 * padding[0] - KH + 1, Wo = W + 2 * padding[1] - KW + 1;
  TORCH_CHECK_VALUE(KH >= 1 && KW >= 1 && Ho >= 1 && Wo >= 1,
                    "the padded input (", H + 2 * padding[0], ", ", W + 2 * padding[1],
                    ") is smaller than the kernel (", KH, ", ", KW, ")");
  at::Tensor bias;
  if (bias_in.has_value()) {
    bias = bias_in->contiguous();
    TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == O && bias.scalar_type() == at::kFloat,
                      "bias must be float32 of shape (", O, "), got ", bias.scalar_type(), " ",
                      bias.sizes());
  }
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor weight = weight_in.permute({0, 2, 3, 1}).contiguous();  // (O, KH, KW, C)
  at::Tensor out =
      at::empty({N, O, Ho, Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) {
    return out;
  }
  const Args args{x.data_ptr<float>(), weight.data_ptr<float>(),
                  bias.defined() ? bias.data_ptr<float>() : nullptr,
                  out.data_ptr<float>(), N, C, H, W, O, KH, KW, padding[0], padding[1], Ho, Wo};
  const int64_t row_multiply_adds = std::max<int64_t>(1, Wo * O * KH * KW * C);
  at::parallel_for(0, N * Ho, std::max<int64_t>(1, kGrainMultiplyAdds / row_multiply_adds),
                   [&](int64_t begin, int64_t end) { convolve_rows(args, begin, end); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dfkd_fast, CPU, m) { m.impl("narrow_conv2d", &narrow_conv2d_cpu); }

}  // namespace narrow_conv
}  // namespace dfkd_fast
