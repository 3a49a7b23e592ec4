// Autograd of dfkd_fast::max_pool2x2 in C++: registered from Python, the autograd of a pooling
// layer's forward and backward cost about 0.2 ms more per call, as much as the kernels take on
// LeNet-5's second pooling. The backward op's own gradient (second derivatives) stays in Python
// (dfkd_fast/ops/max_pool.py): the backward is called through the dispatcher, so that it is
// differentiable when the graph is kept.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace dfkd_fast {
namespace max_pool {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&);
using BackwardSignature = at::Tensor(const at::Tensor&, const at::Tensor&, at::IntArrayRef);

const c10::TypedOperatorHandle<ForwardSignature>& forward_operator() {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("dfkd_fast::max_pool2x2", "")
                                 .typed<ForwardSignature>();
  return handle;
}

const c10::TypedOperatorHandle<BackwardSignature>& backward_operator() {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("dfkd_fast::max_pool2x2_backward", "")
                                 .typed<BackwardSignature>();
  return handle;
}

class MaxPool2x2Function : public torch::autograd::Function<MaxPool2x2Function> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [output, positions] = forward_operator().call(x);
    ctx->save_for_backward({positions});
    ctx->saved_data["input_size"] = x.sizes().vec();
    ctx->mark_non_differentiable({positions});
    return {output, positions};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor positions = ctx->get_saved_variables()[0];
    const std::vector<int64_t> input_size = ctx->saved_data["input_size"].toIntVector();
    return {backward_operator().call(grads[0], positions, input_size)};
  }
};

std::tuple<at::Tensor, at::Tensor> max_pool2x2_autograd(const at::Tensor& x) {
  const variable_list outputs = MaxPool2x2Function::apply(x);
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(dfkd_fast, Autograd, m) { m.impl("max_pool2x2", &max_pool2x2_autograd); }

}  // namespace max_pool
}  // namespace dfkd_fast
