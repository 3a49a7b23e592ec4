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
#include <vector>

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

// One input channel (a classifier's first layer on grey images; the input gradient of a layer to
// one channel): a kernel row meets only KW values, too few for dot products over channels.
// Instead a block of kLanes output pixels of one row is a vector, and each tap adds the input
// vector under it times the tap's weight, broadcast, for up to kMaxSingleBlock channels at once.
// The KH input rows are first copied into zero-padded rows, so that no load needs a bound check.
constexpr int64_t kMaxSingleBlock = 6;
constexpr int kSingleVectors = 2;  // 12 accumulators, 2 input vectors and a weight: 15 registers

// The KH padded input rows of one output row, and where that row's output goes.
struct PaddedRows {
  const float* values;       // KH rows of `width` values
  int64_t width, ilo, ihi;   // rows outside [ilo, ihi) lie in the zero padding
  float* out;                // output pixel 0, channel 0 of the row
  int64_t channel_stride;    // 1 in channels_last; Ho * Wo in the contiguous layout
};

// Output pixels xo .. xo + kVectors * kLanes - 1 (those below Wo), channels o .. o + kChannels - 1:
// each tap's weight, broadcast, multiplies kVectors input vectors.
template <int kChannels, int kVectors>
DFKD_ALWAYS_INLINE void single_channel_block(const Args& a, const PaddedRows& rows, int64_t o,
                                             int64_t xo) {
  Lanes acc[kChannels][kVectors] = {};
  for (int64_t i = rows.ilo; i < rows.ihi; ++i) {
    const float* in = rows.values + i * rows.width + xo;
    const float* w = a.weight + (o * a.KH + i) * a.KW;
    for (int64_t j = 0; j < a.KW; ++j) {
      Lanes values[kVectors];
      for (int v = 0; v < kVectors; ++v) {
        values[v] = load(in + j + v * kLanes);
      }
      for (int c = 0; c < kChannels; ++c) {
        const float tap = w[c * a.KH * a.KW + j];
        for (int v = 0; v < kVectors; ++v) {
          acc[c][v] += values[v] * tap;
        }
      }
    }
  }
  float tile[kChannels][kVectors * kLanes];
  __builtin_memcpy(tile, acc, sizeof tile);
  float bias[kChannels];
  for (int c = 0; c < kChannels; ++c) {
    bias[c] = a.bias ? a.bias[o + c] : 0.0f;
  }
  const int64_t pixels = std::min<int64_t>(kVectors * kLanes, a.Wo - xo);
  if (rows.channel_stride == 1) {
    float* out = rows.out + xo * a.O + o;
    for (int64_t p = 0; p < pixels; ++p) {
      for (int c = 0; c < kChannels; ++c) {
        out[p * a.O + c] = tile[c][p] + bias[c];
      }
    }
    return;
  }
  for (int c = 0; c < kChannels; ++c) {
    float* __restrict out = rows.out + (o + c) * rows.channel_stride + xo;
    for (int64_t p = 0; p < pixels; ++p) {
      out[p] = tile[c][p] + bias[c];
    }
  }
}

// Rows [begin, end) of the (N * Ho) output rows of a one-channel input; `scratch` holds KH padded
// rows of `width` values. The output is channels_last, or contiguous if `planar`.
DFKD_CPU_CLONES void convolve_single_channel_rows(const Args& a, int64_t begin, int64_t end,
                                                  float* scratch, int64_t width, bool planar) {
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / a.Ho, y = row % a.Ho;
    const int64_t ilo = std::max<int64_t>(0, a.pad_h - y);
    const int64_t ihi = std::max(ilo, std::min<int64_t>(a.KH, a.H + a.pad_h - y));
    for (int64_t i = ilo; i < ihi; ++i) {
      float* padded = scratch + i * width;
      std::fill(padded, padded + width, 0.0f);
      std::copy_n(a.x + (n * a.H + y + i - a.pad_h) * a.W, a.W, padded + a.pad_w);
    }
    float* out = planar ? a.out + (n * a.O * a.Ho + y) * a.Wo : a.out + row * a.Wo * a.O;
    const PaddedRows rows{scratch, width, ilo, ihi, out, planar ? a.Ho * a.Wo : 1};
    for (int64_t o = 0; o < a.O; o += kMaxSingleBlock) {
      for (int64_t xo = 0; xo < a.Wo; xo += kSingleVectors * kLanes) {
        switch (std::min(kMaxSingleBlock, a.O - o)) {
          case 1: single_channel_block<1, kSingleVectors>(a, rows, o, xo); break;
          case 2: single_channel_block<2, kSingleVectors>(a, rows, o, xo); break;
          case 3: single_channel_block<3, kSingleVectors>(a, rows, o, xo); break;
          case 4: single_channel_block<4, kSingleVectors>(a, rows, o, xo); break;
          case 5: single_channel_block<5, kSingleVectors>(a, rows, o, xo); break;
          default: single_channel_block<6, kSingleVectors>(a, rows, o, xo);
        }
      }
    }
  }
}

// Strided exactly as channels_last, even where a size-1 axis makes the layouts coincide.
bool strided_channels_last(const at::Tensor& t) {
  return t.stride(1) == 1 && t.stride(3) == t.size(1) && t.stride(2) == t.size(3) * t.size(1);
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
  // One input channel: channels_last as PyTorch's convolution picks it, from x's or the weight's
  // strides; else always.
  const bool planar = C == 1 && !strided_channels_last(x_in) && !strided_channels_last(weight_in);
  at::Tensor out = at::empty(
      {N, O, Ho, Wo}, x.options().memory_format(planar ? at::MemoryFormat::Contiguous
                                                       : at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) {
    return out;
  }
  const Args args{x.data_ptr<float>(), weight.data_ptr<float>(),
                  bias.defined() ? bias.data_ptr<float>() : nullptr,
                  out.data_ptr<float>(), N, C, H, W, O, KH, KW, padding[0], padding[1], Ho, Wo};
  const int64_t row_multiply_adds = std::max<int64_t>(1, Wo * O * KH * KW * C);
  const int64_t grain = std::max<int64_t>(1, kGrainMultiplyAdds / row_multiply_adds);
  if (C == 1) {
    // every vector of kLanes output pixels reads KW - 1 values past it
    const int64_t block = kSingleVectors * kLanes;
    const int64_t width = (Wo + block - 1) / block * block + KW - 1;
    at::parallel_for(0, N * Ho, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(KH * width);
      convolve_single_channel_rows(args, begin, end, scratch.data(), width, planar);
    });
    return out;
  }
  at::parallel_for(0, N * Ho, grain,
                   [&](int64_t begin, int64_t end) { convolve_rows(args, begin, end); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dfkd_fast, CPU, m) { m.impl("narrow_conv2d", &narrow_conv2d_cpu); }

}  // namespace narrow_conv
}  // namespace dfkd_fast
