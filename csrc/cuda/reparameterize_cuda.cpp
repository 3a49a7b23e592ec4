// CUDA registration of dfkd_fast::reparameterize: tensors in, launchers of reparameterize.cu out.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../reparameterize_torch.h"

namespace dfkd_fast {
namespace reparameterize {
namespace {

KeySource key_source(const at::Tensor& key) {
  if (key.is_cuda()) {
    return KeySource{0, key.data_ptr<int64_t>()};
  }
  // A key drawn on the host would be frozen into a captured CUDA graph.
  TORCH_CHECK_VALUE(
      c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
      "reparameterize inside CUDA graph capture needs a CUDA generator: pass generator="
      "torch.Generator(device='cuda')");
  return KeySource{static_cast<uint64_t>(key.item<int64_t>()), nullptr};
}

std::tuple<at::Tensor, at::Tensor> reparameterize_cuda(const at::Tensor& mu,
                                                       const at::Tensor& logvar,
                                                       int64_t num_samples,
                                                       std::optional<at::Generator> generator) {
  const c10::cuda::CUDAGuard device_guard(mu.device());
  ForwardBuffers b =
      prepare_forward(mu, logvar, num_samples, generator,
                      cuda_forward_kl_parts_per_row(mu.dim() > 0 ? mu.size(-1) : 0));
  if (b.args.rows > 0) {
    b.args.key = key_source(b.key);
    const int sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    C10_CUDA_CHECK(static_cast<cudaError_t>(
        cuda_forward(b.args, sm_count, at::cuda::getCurrentCUDAStream().stream())));
  }
  return {b.z, b.kl()};
}

std::tuple<at::Tensor, at::Tensor> reparameterize_backward_cuda(
    const std::optional<at::Tensor>& grad_z, const std::optional<at::Tensor>& grad_kl,
    const at::Tensor& z, const at::Tensor& mu, const at::Tensor& logvar) {
  const c10::cuda::CUDAGuard device_guard(mu.device());
  const BackwardBuffers b = prepare_backward(grad_z, grad_kl, z, mu, logvar);
  if (b.args.rows > 0 && b.args.row_size > 0) {
    C10_CUDA_CHECK(static_cast<cudaError_t>(
        cuda_backward(b.args, at::cuda::getCurrentCUDAStream().stream())));
  }
  return {b.grad_mu, b.grad_logvar};
}

}  // namespace

TORCH_LIBRARY_IMPL(dfkd_fast, CUDA, m) {
  m.impl("reparameterize", &reparameterize_cuda);
  m.impl("reparameterize_backward", &reparameterize_backward_cuda);
}

}  // namespace reparameterize
}  // namespace dfkd_fast
