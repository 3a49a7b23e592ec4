// The schemas of every dfkd_fast operator, in one place, and the Python module dfkd_fast._C.
// Kernels register their implementations per device in cpu/ and cuda/; fake (meta) and autograd
// implementations are registered from Python (dfkd_fast/ops/), except the autograd of kd_div and
// max_pool2x2 (csrc/*_autograd.cpp).
#include <Python.h>
#include <torch/library.h>

#include "cpu/common.h"

TORCH_LIBRARY(dfkd_fast, m) {
  // z = mu + exp(0.5 * logvar) * eps, eps ~ N(0, I) from Philox4x32-10 keyed by one draw from
  // `generator`; z has shape (num_samples, *mu.shape). kl (float32, shape mu.shape[:-1]) is
  // -0.5 * sum(1 + logvar - mu^2 - exp(logvar)) over the last dimension.
  m.def(
      "reparameterize(Tensor mu, Tensor logvar, int num_samples=1, Generator? generator=None)"
      " -> (Tensor z, Tensor kl)",
      {at::Tag::nondeterministic_seeded, at::Tag::pt2_compliant_tag});
  // Gradients of reparameterize from its outputs: d z / d logvar = 0.5 (z - mu), no stored noise.
  m.def(
      "reparameterize_backward(Tensor? grad_z, Tensor? grad_kl, Tensor z, Tensor mu,"
      " Tensor logvar) -> (Tensor grad_mu, Tensor grad_logvar)",
      {at::Tag::pt2_compliant_tag});

  // Distillation divergences on (rows, classes) logits: loss = T^2 * D(softmax(teacher / T),
  // softmax(student / T)) per row ("kl" or "js"), times `weight`, reduced by "none" | "sum" |
  // "mean" | "batchmean"; stats (rows, 6) float32 are the row statistics backward needs. The C++
  // kernels serve CPU tensors; CUDA tensors use the Triton op dfkd_fast::kd_div_triton, which has
  // the same signature.
  m.def(
      "kd_div(Tensor student, Tensor teacher, Tensor? weight, float temperature, str reduction,"
      " str divergence) -> (Tensor loss, Tensor stats)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "kd_div_backward(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? weight,"
      " Tensor stats, float temperature, str reduction, str divergence, bool need_student,"
      " bool need_teacher) -> (Tensor grad_student, Tensor grad_teacher)",
      {at::Tag::pt2_compliant_tag});

  // BatchNorm statistics of x (N, C, *) and, given running statistics, the DeepInversion loss
  // ||mean' - running_mean|| + ||var' - running_var|| (mean' blended with the ema by momentum);
  // with scale/shift also the eval BatchNorm output y = x * scale + shift, from one read of x.
  // Channel vectors are float32; loss (0-d) and norms (2,) are empty without running statistics,
  // y without scale. The C++ kernels serve CPU tensors; CUDA tensors use the Triton operator
  // dfkd_fast::bn_stat_loss_triton, which has the same signature.
  m.def(
      "bn_stat_loss(Tensor x, Tensor? running_mean, Tensor? running_var, Tensor? ema_mean,"
      " Tensor? ema_var, float momentum, Tensor? scale, Tensor? shift)"
      " -> (Tensor loss, Tensor mean, Tensor var, Tensor y, Tensor norms)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "bn_stat_loss_backward(Tensor x, Tensor mean, Tensor var, Tensor norms,"
      " Tensor? running_mean, Tensor? running_var, Tensor? ema_mean, Tensor? ema_var,"
      " float momentum, Tensor? scale, Tensor? grad_loss, Tensor? grad_mean, Tensor? grad_var,"
      " Tensor? grad_y) -> Tensor grad_x",
      {at::Tag::pt2_compliant_tag});

  // A stride-1 convolution (cross-correlation) of x (N, C, H, W) with weight (O, C, KH, KW), zero
  // padding (ph, pw), plus bias: conv2d(x, weight, bias, padding=padding) in float32, for few
  // output channels or one input channel (see cpu/narrow_conv.cpp). The output is channels_last
  // (for one input channel: where x or the weight is strided so, as conv2d picks). CPU only; its
  // gradients are convolutions registered from Python (dfkd_fast/ops/few_channel_conv.py).
  m.def("narrow_conv2d(Tensor x, Tensor weight, Tensor? bias, int[2] padding) -> Tensor",
        {at::Tag::pt2_compliant_tag});

  // 2x2 max-pooling, stride 2, of x (N, C, H, W) float32: max_pool2d(x, 2) in channels_last, and
  // the position of each maximum in its window (uint8, 0 to 3 row-major; the first maximum, NaN
  // winning, as max_pool2d). CPU only (cpu/max_pool.cpp); autograd is registered from Python
  // (dfkd_fast/ops/max_pool.py).
  m.def("max_pool2x2(Tensor x) -> (Tensor output, Tensor indices)", {at::Tag::pt2_compliant_tag});
  m.def("max_pool2x2_backward(Tensor grad_output, Tensor indices, int[4] input_size) -> Tensor",
        {at::Tag::pt2_compliant_tag});

  // The interleaving of upsample_conv2d's four parity maps (N, 4 O, H + 1, W + 1) into its output
  // (N, O, 2H, 2W), and the maps' gradient from the output's, for contiguous or channels_last
  // tensors of 2- or 4-byte elements. CPU only (cpu/interleave_parities.cpp); they serve the
  // operators dfkd_fast::interleave_parities(_backward), which own autograd and run a strided
  // copy elsewhere (dfkd_fast/ops/upsample_conv.py).
  m.def("interleave_parities_kernel(Tensor maps) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("interleave_parities_backward_kernel(Tensor grad_output) -> Tensor",
        {at::Tag::pt2_compliant_tag});
}

namespace {

PyObject* cpu_kernel_target(PyObject*, PyObject*) {
  return PyUnicode_FromString(dfkd_fast::cpu::kernel_target());
}

PyMethodDef module_methods[] = {
    {"cpu_kernel_target", cpu_kernel_target, METH_NOARGS,
     "The instruction-set level of the CPU kernels the loader picked on this CPU."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
// Importing dfkd_fast._C loads this library, which registers the operators.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          module_methods};
  return PyModule_Create(&module_def);
}
}
