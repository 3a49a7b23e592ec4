// CPU kernels of the interleaving in upsample_conv2d (dfkd_fast/ops/upsample_conv.py): the four
// parity maps (N, 4 O, H + 1, W + 1), channels ordered (a, b, o), become the output (N, O, 2H, 2W)
//     out[n, o, 2i + a, 2j + b] = maps[n, (2a + b) O + o, i + a, j + b],
// and the backward writes each parity's window of the maps' gradient from the output's gradient,
// with zeros in the one row and column of each map that no output pixel reads.
//
// PyTorch's strided copy of the same views walks six dimensions whose innermost run, in
// channels_last, is the O channels of one pixel: several times a plain copy of the output.
// Here each task is one contiguous row of what is written, in channels_last (N, H, W, C) or
// contiguous (N, C, H, W). Pure data movement, so the kernels copy 2- or 4-byte elements whatever
// their dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "common.h"

namespace dfkd_fast {
namespace interleave_parities {
namespace {

constexpr int64_t kGrainElements = 16384;

struct Args {
  const void* source;
  void* destination;
  int64_t N, O, H, W;  // the output is (N, O, 2H, 2W), the maps (N, 4 O, H + 1, W + 1)
};

template <typename Bits>
DFKD_ALWAYS_INLINE void copy_run(const Bits* __restrict from, Bits* __restrict to, int64_t count) {
  for (int64_t k = 0; k < count; ++k) {
    to[k] = from[k];
  }
}

template <typename Bits>
DFKD_ALWAYS_INLINE void zero_run(Bits* __restrict to, int64_t count) {
  for (int64_t k = 0; k < count; ++k) {
    to[k] = 0;
  }
}

// In channels_last the runs are a pixel's O channels. kChannels > 0 fixes O at compile time, so
// that a layer with one to four output channels copies them without a loop per pixel.
template <typename Bits, int kChannels>
DFKD_ALWAYS_INLINE void interleave_row_nhwc(const Bits* __restrict parities, Bits* __restrict row,
                                            int64_t W, int64_t O_runtime) {
  const int64_t O = kChannels > 0 ? kChannels : O_runtime, map_pixel = 4 * O;
  for (int64_t j = 0; j < W; ++j) {
    copy_run(parities + j * map_pixel, row + 2 * j * O, O);
    copy_run(parities + (j + 1) * map_pixel + O, row + (2 * j + 1) * O, O);
  }
}

// Map pixel c of parities (a, 0) and (a, 1) in a map row whose output row exists: (a, 0) is output
// pixel 2c, for c < W; (a, 1) is output pixel 2c - 1, for c >= 1; the other is zero.
template <typename Bits, int kChannels>
DFKD_ALWAYS_INLINE void gather_row_nhwc(const Bits* __restrict source, Bits* __restrict row,
                                        int64_t W, int64_t O_runtime) {
  const int64_t O = kChannels > 0 ? kChannels : O_runtime, map_pixel = 4 * O;
  copy_run(source, row, O);
  zero_run(row + O, O);
  for (int64_t c = 1; c < W; ++c) {
    copy_run(source + 2 * c * O, row + c * map_pixel, O);
    copy_run(source + (2 * c - 1) * O, row + c * map_pixel + O, O);
  }
  zero_run(row + W * map_pixel, O);
  copy_run(source + (2 * W - 1) * O, row + W * map_pixel + O, O);
}

template <typename Bits>
DFKD_ALWAYS_INLINE void zero_half_pixels_nhwc(Bits* __restrict row, int64_t W, int64_t O) {
  for (int64_t c = 0; c <= W; ++c) {
    zero_run(row + c * 4 * O, 2 * O);
  }
}

#define DFKD_BY_CHANNELS(function, Bits, O, ...) \
  switch (O) {                                   \
    case 1:                                      \
      function<Bits, 1>(__VA_ARGS__, O);         \
      break;                                     \
    case 2:                                      \
      function<Bits, 2>(__VA_ARGS__, O);         \
      break;                                     \
    case 3:                                      \
      function<Bits, 3>(__VA_ARGS__, O);         \
      break;                                     \
    case 4:                                      \
      function<Bits, 4>(__VA_ARGS__, O);         \
      break;                                     \
    default:                                     \
      function<Bits, 0>(__VA_ARGS__, O);         \
  }

// Output rows [begin, end) of the N * 2H, channels_last: pixel (2i + a, 2j + b) is the O
// channels of parity (a, b) at map pixel (i + a, j + b).
template <typename Bits>
DFKD_ALWAYS_INLINE void interleave_rows_nhwc(const Args& s, int64_t begin, int64_t end) {
  const Bits* maps = static_cast<const Bits*>(s.source);
  Bits* out = static_cast<Bits*>(s.destination);
  const int64_t map_row = (s.W + 1) * 4 * s.O;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / (2 * s.H), y = r % (2 * s.H), i = y / 2, a = y % 2;
    const Bits* parities = maps + (n * (s.H + 1) + i + a) * map_row + 2 * a * s.O;
    Bits* row = out + r * 2 * s.W * s.O;
    DFKD_BY_CHANNELS(interleave_row_nhwc, Bits, s.O, parities, row, s.W)
  }
}

// Map rows [begin, end) of the N * (H + 1), channels_last: map pixel (r, c) of parity (a, b) is
// output pixel (2 (r - a) + a, 2 (c - b) + b) where that lies inside the output, else zero.
template <typename Bits>
DFKD_ALWAYS_INLINE void gather_rows_nhwc(const Args& s, int64_t begin, int64_t end) {
  const Bits* grad_out = static_cast<const Bits*>(s.source);
  Bits* grad_maps = static_cast<Bits*>(s.destination);
  const int64_t out_row = 2 * s.W * s.O;
  for (int64_t m = begin; m < end; ++m) {
    const int64_t n = m / (s.H + 1), r = m % (s.H + 1);
    for (int64_t a = 0; a < 2; ++a) {
      const int64_t i = r - a;
      Bits* row = grad_maps + m * (s.W + 1) * 4 * s.O + 2 * a * s.O;
      if (i < 0 || i >= s.H) {
        zero_half_pixels_nhwc(row, s.W, s.O);
        continue;
      }
      const Bits* source = grad_out + (n * 2 * s.H + 2 * i + a) * out_row;
      DFKD_BY_CHANNELS(gather_row_nhwc, Bits, s.O, source, row, s.W)
    }
  }
}

// Output rows [begin, end) of the N * O * 2H, contiguous: even columns from parity (a, 0)'s map
// row i + a, odd ones from parity (a, 1)'s, one column further.
template <typename Bits>
DFKD_ALWAYS_INLINE void interleave_rows_nchw(const Args& s, int64_t begin, int64_t end) {
  const Bits* maps = static_cast<const Bits*>(s.source);
  Bits* out = static_cast<Bits*>(s.destination);
  const int64_t map_row = s.W + 1, map_plane = (s.H + 1) * map_row;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t no = r / (2 * s.H), y = r % (2 * s.H), i = y / 2, a = y % 2;
    const int64_t n = no / s.O, o = no % s.O;
    const Bits* __restrict even = maps + (n * 4 * s.O + 2 * a * s.O + o) * map_plane +
                                  (i + a) * map_row;
    const Bits* __restrict odd = even + s.O * map_plane + 1;
    Bits* __restrict row = out + r * 2 * s.W;
    for (int64_t j = 0; j < s.W; ++j) {
      row[2 * j] = even[j];
      row[2 * j + 1] = odd[j];
    }
  }
}

// Rows [begin, end) of the N * O * (H + 1): map row r of the four parities of channel o. Parity
// (a, b)'s row r is output row 2 (r - a) + a, its even (b = 0) or odd (b = 1) columns, one column
// further for b = 1; zero where r - a is outside the output, and in the column no pixel reads.
template <typename Bits>
DFKD_ALWAYS_INLINE void gather_rows_nchw(const Args& s, int64_t begin, int64_t end) {
  const Bits* grad_out = static_cast<const Bits*>(s.source);
  Bits* grad_maps = static_cast<Bits*>(s.destination);
  const int64_t map_row = s.W + 1, map_plane = (s.H + 1) * map_row;
  for (int64_t m = begin; m < end; ++m) {
    const int64_t no = m / (s.H + 1), r = m % (s.H + 1), n = no / s.O, o = no % s.O;
    for (int64_t a = 0; a < 2; ++a) {
      const int64_t i = r - a;
      Bits* __restrict even = grad_maps + (n * 4 * s.O + 2 * a * s.O + o) * map_plane +
                              r * map_row;
      Bits* __restrict odd = even + s.O * map_plane;
      if (i < 0 || i >= s.H) {
        zero_run(even, map_row);
        zero_run(odd, map_row);
        continue;
      }
      const Bits* __restrict source = grad_out + (no * 2 * s.H + 2 * i + a) * 2 * s.W;
      even[s.W] = 0;
      odd[0] = 0;
      for (int64_t j = 0; j < s.W; ++j) {
        even[j] = source[2 * j];
        odd[j + 1] = source[2 * j + 1];
      }
    }
  }
}

using Rows = void (*)(const Args&, int64_t, int64_t);

// `table`: rows_function<uint16_t> and <uint32_t>, each compiled for every CPU clone.
#define DFKD_ELEMENT_SIZE_CLONES(table, rows_function)                         \
  DFKD_CPU_CLONES void table##_16(const Args& s, int64_t begin, int64_t end) { \
    rows_function<uint16_t>(s, begin, end);                                    \
  }                                                                            \
  DFKD_CPU_CLONES void table##_32(const Args& s, int64_t begin, int64_t end) { \
    rows_function<uint32_t>(s, begin, end);                                    \
  }                                                                            \
  const Rows table[2] = {table##_16, table##_32};

DFKD_ELEMENT_SIZE_CLONES(interleave_nhwc, interleave_rows_nhwc)
DFKD_ELEMENT_SIZE_CLONES(interleave_nchw, interleave_rows_nchw)
DFKD_ELEMENT_SIZE_CLONES(gather_nhwc, gather_rows_nhwc)
DFKD_ELEMENT_SIZE_CLONES(gather_nchw, gather_rows_nchw)

// channels_last when the tensor is laid out so and not also contiguous, as the Python side picks.
bool channels_last(const at::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

void check_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.element_size() == 2 || t.element_size() == 4,
                   name, " must have 2- or 4-byte elements, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast), name,
                    " must be contiguous or channels_last, got strides ", t.strides());
}

// An empty tensor of `size` in `like`'s layout.
at::Tensor empty_in_layout_of(const at::Tensor& like, at::IntArrayRef size) {
  return at::empty(size, like.options().memory_format(channels_last(like)
                                                           ? at::MemoryFormat::ChannelsLast
                                                           : at::MemoryFormat::Contiguous));
}

void run_rows(const Args& args, int64_t rows, int64_t row_elements, const Rows (&by_size)[2],
              int64_t element_size) {
  const Rows kernel = by_size[element_size == 2 ? 0 : 1];
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, row_elements));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) { kernel(args, begin, end); });
}

at::Tensor interleave_parities_cpu(const at::Tensor& maps) {
  TORCH_CHECK_VALUE(maps.dim() == 4 && maps.size(1) % 4 == 0 && maps.size(2) >= 2 &&
                        maps.size(3) >= 2,
                    "maps must have shape (N, 4 * out_channels, H + 1, W + 1) with H, W >= 1, "
                    "got ", maps.sizes());
  check_tensor(maps, "maps");
  const int64_t N = maps.size(0), O = maps.size(1) / 4, H = maps.size(2) - 1, W = maps.size(3) - 1;
  at::Tensor out = empty_in_layout_of(maps, {N, O, 2 * H, 2 * W});
  if (out.numel() == 0) {
    return out;
  }
  const Args args{maps.data_ptr(), out.data_ptr(), N, O, H, W};
  if (channels_last(maps)) {
    run_rows(args, N * 2 * H, 2 * W * O, interleave_nhwc, maps.element_size());
  } else {
    run_rows(args, N * O * 2 * H, 2 * W, interleave_nchw, maps.element_size());
  }
  return out;
}

at::Tensor interleave_parities_backward_cpu(const at::Tensor& grad_output) {
  TORCH_CHECK_VALUE(grad_output.dim() == 4 && grad_output.size(2) % 2 == 0 &&
                        grad_output.size(3) % 2 == 0,
                    "grad_output must have shape (N, O, 2H, 2W), got ", grad_output.sizes());
  check_tensor(grad_output, "grad_output");
  const int64_t N = grad_output.size(0), O = grad_output.size(1);
  const int64_t H = grad_output.size(2) / 2, W = grad_output.size(3) / 2;
  at::Tensor grad_maps = empty_in_layout_of(grad_output, {N, 4 * O, H + 1, W + 1});
  if (grad_maps.numel() == 0) {
    return grad_maps;
  }
  const Args args{grad_output.data_ptr(), grad_maps.data_ptr(), N, O, H, W};
  if (channels_last(grad_output)) {
    run_rows(args, N * (H + 1), (W + 1) * 4 * O, gather_nhwc, grad_output.element_size());
  } else {
    run_rows(args, N * O * (H + 1), 4 * (W + 1), gather_nchw, grad_output.element_size());
  }
  return grad_maps;
}

}  // namespace

TORCH_LIBRARY_IMPL(dfkd_fast, CPU, m) {
  m.impl("interleave_parities_kernel", &interleave_parities_cpu);
  m.impl("interleave_parities_backward_kernel", &interleave_parities_backward_cpu);
}

}  // namespace interleave_parities
}  // namespace dfkd_fast
