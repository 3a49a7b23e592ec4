// Torch-side pieces of dfkd_fast::reparameterize shared by the CPU and CUDA registrations:
// argument checks, the key draw, contiguous inputs and output allocation.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

#include <limits>
#include <optional>
#include <vector>

#include "reparameterize_common.h"

namespace dfkd_fast {
namespace reparameterize {

inline DType kernel_dtype(const at::Tensor& tensor, const char* name) {
  switch (tensor.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, float16 or bfloat16, got ",
                       tensor.scalar_type());
  }
}

inline at::Device current_device(at::DeviceType type) {
  return c10::impl::getDeviceGuardImpl(type)->getDevice();
}

struct RowLayout {
  int64_t rows;
  int64_t row_size;
  int64_t num_samples;
};

inline RowLayout check_forward_args(const at::Tensor& mu, const at::Tensor& logvar,
                                    int64_t num_samples,
                                    const std::optional<at::Generator>& generator) {
  kernel_dtype(mu, "mu");
  TORCH_CHECK_TYPE(logvar.scalar_type() == mu.scalar_type(), "logvar must have the dtype of mu (",
                   mu.scalar_type(), "), got ", logvar.scalar_type());
  TORCH_CHECK_VALUE(logvar.device() == mu.device(), "logvar must be on the device of mu (",
                    mu.device(), "), got ", logvar.device());
  TORCH_CHECK_VALUE(mu.dim() >= 1, "mu must have at least one dimension (the latent dimension)");
  TORCH_CHECK_VALUE(logvar.sizes() == mu.sizes(), "logvar must have the shape of mu ",
                    mu.sizes(), ", got ", logvar.sizes());
  TORCH_CHECK_VALUE(num_samples >= 1 && num_samples <= std::numeric_limits<int32_t>::max(),
                    "num_samples must be in [1, 2^31 - 1], got ", num_samples);
  if (generator.has_value()) {
    const at::Device device = generator->device();
    // torch.Generator("cuda") reports no index: it means the current device, as in the Python check
    const bool usable = device.is_cpu() ||
                        (device.has_index() ? device : current_device(device.type())) == mu.device();
    TORCH_CHECK_VALUE(usable,
                      "generator must be a CPU generator or one on the device of mu (",
                      mu.device(), "), got one on ", device);
  }
  const auto sizes = mu.sizes();
  return RowLayout{c10::multiply_integers(sizes.slice(0, sizes.size() - 1)), sizes.back(),
                   num_samples};
}

// The 64-bit Philox key of one call: drawn from `generator` (the default CPU generator when
// none is given) exactly as torch.randint(-2**63, 2**63 - 1, (1,), generator=...) draws it, so the
// pure-PyTorch reference reproduces the stream. A CUDA generator gives a key in device memory.
inline at::Tensor draw_key(const std::optional<at::Generator>& generator) {
  const at::Device device = generator.has_value() ? generator->device() : at::Device(at::kCPU);
  return at::randint(std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max(),
                     {1}, generator, at::TensorOptions().dtype(at::kLong).device(device));
}

inline std::vector<int64_t> sample_shape(const at::Tensor& mu, int64_t num_samples) {
  std::vector<int64_t> shape{num_samples};
  shape.insert(shape.end(), mu.sizes().begin(), mu.sizes().end());
  return shape;
}

// Inputs made contiguous, the key, and the outputs of one forward call.
struct ForwardBuffers {
  at::Tensor mu, logvar, key, z, kl_parts;
  ForwardArgs args;  // args.key is for the device code to fill in from `key`

  // The kernels write -0.5 * (partial sums of kl_term) per (row, part); the KL is their sum.
  at::Tensor kl() const {
    const auto sizes = mu.sizes();
    at::Tensor kl = at::empty(sizes.slice(0, sizes.size() - 1), mu.options().dtype(at::kFloat));
    if (kl.numel() == 0) {
      return kl;
    }
    if (kl_parts.size(1) == 1) {
      return kl_parts.view(kl.sizes());
    }
    at::Tensor kl_flat = kl.view({-1});
    at::sum_out(kl_flat, kl_parts, {1});
    return kl;
  }
};

inline ForwardBuffers prepare_forward(const at::Tensor& mu, const at::Tensor& logvar,
                                      int64_t num_samples,
                                      const std::optional<at::Generator>& generator,
                                      int64_t kl_parts_per_row) {
  const RowLayout layout = check_forward_args(mu, logvar, num_samples, generator);
  ForwardBuffers b;
  b.mu = mu.contiguous();
  b.logvar = logvar.contiguous();
  b.key = draw_key(generator);
  b.z = at::empty(sample_shape(mu, num_samples), mu.options());
  b.kl_parts = at::empty({layout.rows, kl_parts_per_row}, mu.options().dtype(at::kFloat));
  b.args = ForwardArgs{kernel_dtype(mu, "mu"),
                       b.mu.data_ptr(),
                       b.logvar.data_ptr(),
                       b.z.data_ptr(),
                       b.kl_parts.data_ptr<float>(),
                       layout.rows,
                       layout.row_size,
                       num_samples,
                       kl_parts_per_row,
                       KeySource{0, nullptr}};
  return b;
}

inline void check_backward_args(const std::optional<at::Tensor>& grad_z,
                                const std::optional<at::Tensor>& grad_kl, const at::Tensor& z,
                                const at::Tensor& mu, const at::Tensor& logvar) {
  kernel_dtype(mu, "mu");
  TORCH_CHECK_TYPE(logvar.scalar_type() == mu.scalar_type() && z.scalar_type() == mu.scalar_type(),
                   "z, mu and logvar must share one dtype");
  TORCH_CHECK_VALUE(mu.dim() >= 1 && logvar.sizes() == mu.sizes() && z.dim() == mu.dim() + 1 &&
                        z.sizes().slice(1) == mu.sizes(),
                    "z must have shape (num_samples, *mu.shape) and logvar the shape of mu");
  TORCH_CHECK_VALUE(logvar.device() == mu.device() && z.device() == mu.device(),
                    "z, mu and logvar must be on one device");
  if (grad_z.has_value()) {
    TORCH_CHECK_VALUE(grad_z->sizes() == z.sizes(), "grad_z must have the shape of z");
    TORCH_CHECK_VALUE(grad_z->device() == mu.device(), "grad_z must be on the device of mu");
  }
  if (grad_kl.has_value()) {
    TORCH_CHECK_VALUE(grad_kl->sizes() == mu.sizes().slice(0, mu.dim() - 1),
                      "grad_kl must have shape mu.shape[:-1]");
    TORCH_CHECK_VALUE(grad_kl->device() == mu.device(), "grad_kl must be on the device of mu");
  }
}

// Inputs made contiguous (grad_z in the dtype of mu, grad_kl in float32) and the outputs of one
// backward call.
struct BackwardBuffers {
  at::Tensor grad_z, grad_kl, z, mu, logvar, grad_mu, grad_logvar;
  BackwardArgs args;
};

inline BackwardBuffers prepare_backward(const std::optional<at::Tensor>& grad_z,
                                        const std::optional<at::Tensor>& grad_kl,
                                        const at::Tensor& z, const at::Tensor& mu,
                                        const at::Tensor& logvar) {
  check_backward_args(grad_z, grad_kl, z, mu, logvar);
  BackwardBuffers b;
  b.grad_z = grad_z.has_value() ? grad_z->to(mu.scalar_type()).contiguous() : at::Tensor();
  b.grad_kl = grad_kl.has_value() ? grad_kl->to(at::kFloat).contiguous() : at::Tensor();
  b.z = z.contiguous();
  b.mu = mu.contiguous();
  b.logvar = logvar.contiguous();
  b.grad_mu = at::empty_like(b.mu);
  b.grad_logvar = at::empty_like(b.logvar);
  const int64_t row_size = mu.size(-1);
  b.args = BackwardArgs{kernel_dtype(mu, "mu"),
                        b.grad_z.defined() ? b.grad_z.data_ptr() : nullptr,
                        b.grad_kl.defined() ? b.grad_kl.data_ptr<float>() : nullptr,
                        b.z.data_ptr(),
                        b.mu.data_ptr(),
                        b.logvar.data_ptr(),
                        b.grad_mu.data_ptr(),
                        b.grad_logvar.data_ptr(),
                        row_size == 0 ? 0 : mu.numel() / row_size,
                        row_size,
                        z.size(0)};
  return b;
}

}  // namespace reparameterize
}  // namespace dfkd_fast

