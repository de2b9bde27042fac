// fxquant's fake-quant ops behind torch's dispatcher: the CPU kernels (the passes of fake_quant.c) and the autograd
// node, in C++.
//
// The ops are defined (their schemas) by fxquant/quant/ops.py, which loads this library after defining them:
//   fxquant::fake_quantize(x, scale, zero_point, qmin, qmax, grad_factor, input_low, input_high) -> y
//   fxquant::fake_quantize_backward(grad, x, scale, zero_point, qmin, qmax, grad_factor, input_low, input_high,
//                                   output_mask) -> (grad_x, grad_scale, grad_offset)
//   fxquant::fake_quantize_dynamic(x, qmin, qmax, symmetric) -> y
// This file registers:
// * for CPU, the two passes of fake_quant.c (float32 arithmetic; bf16/fp16 tensors are widened to float32 and the
//   results rounded back, which is exact for the gradient and what the reference does for the values);
// * for Autograd (every device), the node: its forward re-dispatches fxquant::fake_quantize below autograd and its
//   backward calls fxquant::fake_quantize_backward through the dispatcher, so each device's kernel is reached
//   (C here on CPU, Triton on CUDA, the torch-ops reference elsewhere; ops.py registers those). Only x, the step
//   and the offset are saved: the quantized value is recomputed in the backward pass. fake_quantize_dynamic's node
//   saves nothing: its gradient passes straight through.
//
// Why the node is C++ and not torch.library.register_autograd: a quantizer call is mostly fixed cost on a small
// CNN (mobilenet_v2 has 106 quantizers), and the Python autograd path costs several times more per call.
//
// Built and loaded by fxquant/quant/native_build.py (linked with fake_quant.c compiled as C into an object).
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <cmath>

extern "C" {
void fxq_forward(const float *x, float *out, int64_t rows, int64_t inner, const float *scale, int64_t scale_stride,
                 const float *offset, int64_t offset_stride, float min_step, float qmin, float qmax, float in_low,
                 float in_high, int threads);
int fxq_backward(const float *grad, const float *x, float *grad_x, int64_t rows, int64_t inner, const float *scale,
                 int64_t scale_stride, const float *offset, int64_t offset_stride, float min_step, float qmin,
                 float qmax, float in_low, float in_high, float grad_factor, float *grad_scale, float *grad_offset,
                 int threads);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Mask = std::array<bool, 3>;
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

constexpr double kMinStep = 1e-8;  // fxquant/quant/grid.py's MIN_STEP, as a float32 in the passes

// Whether the passes can run over x where it lies: dense in a format whose outermost dimension is dim 0
// (contiguous, channels-last), so each row along dim 0 is one block of storage.
bool rows_are_blocks(const at::Tensor &x) {
  return x.is_contiguous() || (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
         (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d));
}

// x as float32 in a layout the passes run over: itself when it already is.
at::Tensor as_blocks(const at::Tensor &x) {
  at::Tensor t = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  return rows_are_blocks(t) ? t : t.contiguous();
}

// t (computed over `blocks`, x's shape) as `dtype` with the strides of at::empty_like(x), what the fake kernel says:
// t itself in the usual case (x dense, so t has x's strides), a copy otherwise. No allocation on the fast path.
at::Tensor like_x(const at::Tensor &t, const at::Tensor &x, at::ScalarType dtype) {
  const at::Tensor out = t.scalar_type() == dtype ? t : t.to(dtype);
  if (out.strides() == x.strides()) return out;
  at::Tensor expected = at::empty_like(x, out.options());
  return expected.strides() == out.strides() ? out : expected.copy_(out);
}

at::Tensor nothing(const at::Tensor &like) { return at::empty({0}, like.options()); }

// per-row sums as the gradient of a parameter: summed when one value serves every row
at::Tensor per_parameter(const at::Tensor &rows, const at::Tensor &parameter) {
  return (parameter.numel() == rows.numel() ? rows : rows.sum()).reshape(parameter.sizes());
}

struct Rows {
  int64_t rows, inner, scale_stride, offset_stride;
};

// What the passes assume, checked on every call: a wrong caller gets an error, not a read past a buffer.
Rows check_arguments(const char *op, const at::Tensor &x, const at::Tensor &scale,
                     const std::optional<at::Tensor> &zero_point) {
  TORCH_CHECK(x.device().is_cpu() && at::isFloatingType(x.scalar_type()), op,
              ": x must be a floating-point CPU tensor, got ", x.scalar_type(), " on ", x.device());
  TORCH_CHECK(scale.device().is_cpu() && scale.scalar_type() == at::kFloat, op,
              ": scale must be a float32 CPU tensor, got ", scale.scalar_type(), " on ", scale.device());
  const int64_t steps = scale.numel();
  TORCH_CHECK(steps == 1 || (x.dim() > 0 && x.size(0) == steps), op,
              ": scale must hold one step, or one per row of x along dim 0 (x ", x.sizes(), ", scale ",
              scale.sizes(), ")");
  int64_t offsets = 0;
  if (zero_point.has_value() && zero_point->defined()) {
    offsets = zero_point->numel();
    TORCH_CHECK(zero_point->device().is_cpu() && zero_point->scalar_type() == at::kFloat, op,
                ": zero_point must be a float32 CPU tensor");
    TORCH_CHECK(offsets == 1 || offsets == steps, op, ": zero_point must hold one offset, or one per step (",
                offsets, " offsets, ", steps, " steps)");
  }
  const int64_t rows = std::max(steps, offsets);
  return Rows{rows, rows ? x.numel() / rows : 0, steps == 1 ? 0 : 1, offsets == 1 ? 0 : 1};
}

const float *offset_data(const std::optional<at::Tensor> &zero_point, at::Tensor &keep) {
  if (!zero_point.has_value() || !zero_point->defined()) return nullptr;
  keep = zero_point->contiguous();
  return keep.const_data_ptr<float>();
}

at::Tensor forward_cpu(const at::Tensor &x, const at::Tensor &scale, const std::optional<at::Tensor> &zero_point,
                       int64_t qmin, int64_t qmax, double grad_factor, double input_low, double input_high) {
  const Rows r = check_arguments("fxquant::fake_quantize", x, scale, zero_point);
  if (x.numel() == 0) return at::empty_like(x);
  const at::Tensor blocks = as_blocks(x), steps = scale.contiguous();
  at::Tensor offsets;
  const float *offset = offset_data(zero_point, offsets);
  at::Tensor out = at::empty_like(blocks);  // the same strides as the dense blocks, so the same storage order
  fxq_forward(blocks.const_data_ptr<float>(), out.mutable_data_ptr<float>(), r.rows, r.inner,
              steps.const_data_ptr<float>(), r.scale_stride, offset, r.offset_stride, kMinStep, qmin, qmax,
              input_low, input_high, at::get_num_threads());
  return like_x(out, x, x.scalar_type());
}

Grads backward_cpu(const at::Tensor &grad, const at::Tensor &x, const at::Tensor &scale,
                   const std::optional<at::Tensor> &zero_point, int64_t qmin, int64_t qmax, double grad_factor,
                   double input_low, double input_high, Mask mask) {
  const Rows r = check_arguments("fxquant::fake_quantize_backward", x, scale, zero_point);
  TORCH_CHECK(grad.sizes() == x.sizes(), "fxquant::fake_quantize_backward: grad ", grad.sizes(), " and x ",
              x.sizes(), " differ in shape");
  const bool want_offset = mask[2] && zero_point.has_value() && zero_point->defined();
  if (x.numel() == 0)  // nothing to sum: zero gradients of the asked shapes
    return {mask[0] ? at::zeros_like(x) : nothing(x), mask[1] ? at::zeros_like(scale) : nothing(scale),
            want_offset ? at::zeros_like(*zero_point) : nothing(scale)};
  const at::Tensor blocks = as_blocks(x), steps = scale.contiguous();
  // grad brought to the storage order of the blocks
  const at::Tensor g = grad.to(at::kFloat).contiguous(blocks.suggest_memory_format());
  at::Tensor offsets;
  const float *offset = offset_data(zero_point, offsets);
  at::Tensor gx = mask[0] ? at::empty_like(blocks) : at::Tensor();
  // the sums are per row; a step or offset shared by several rows gets their total
  at::Tensor row_scale = mask[1] ? at::empty({r.rows}, scale.options()) : at::Tensor();
  at::Tensor row_offset = want_offset ? at::empty({r.rows}, scale.options()) : at::Tensor();
  const int status = fxq_backward(
      g.const_data_ptr<float>(), blocks.const_data_ptr<float>(), mask[0] ? gx.mutable_data_ptr<float>() : nullptr,
      r.rows, r.inner, steps.const_data_ptr<float>(), r.scale_stride, offset, r.offset_stride, kMinStep, qmin, qmax,
      input_low, input_high, grad_factor, mask[1] ? row_scale.mutable_data_ptr<float>() : nullptr,
      want_offset ? row_offset.mutable_data_ptr<float>() : nullptr, at::get_num_threads());
  TORCH_CHECK(status == 0, "fxquant's native kernel could not allocate sums for ", r.rows, " rows");
  return {mask[0] ? like_x(gx, x, grad.scalar_type()) : nothing(x),
          mask[1] ? per_parameter(row_scale, scale) : nothing(scale),
          want_offset ? per_parameter(row_offset, *zero_point) : nothing(scale)};
}

// The ops as the dispatcher knows them, looked up once (ops.py defines them before loading this library).
c10::TypedOperatorHandle<at::Tensor(const at::Tensor &, const at::Tensor &, const std::optional<at::Tensor> &,
                                    int64_t, int64_t, double, double, double)> &
forward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fxquant::fake_quantize", "")
                       .typed<at::Tensor(const at::Tensor &, const at::Tensor &, const std::optional<at::Tensor> &,
                                         int64_t, int64_t, double, double, double)>();
  return op;
}

c10::TypedOperatorHandle<Grads(const at::Tensor &, const at::Tensor &, const at::Tensor &,
                               const std::optional<at::Tensor> &, int64_t, int64_t, double, double, double, Mask)> &
backward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fxquant::fake_quantize_backward", "")
                       .typed<Grads(const at::Tensor &, const at::Tensor &, const at::Tensor &,
                                    const std::optional<at::Tensor> &, int64_t, int64_t, double, double, double,
                                    Mask)>();
  return op;
}

c10::TypedOperatorHandle<at::Tensor(const at::Tensor &, int64_t, int64_t, bool)> &dynamic_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fxquant::fake_quantize_dynamic", "")
                       .typed<at::Tensor(const at::Tensor &, int64_t, int64_t, bool)>();
  return op;
}

class FakeQuantizeFunction : public torch::autograd::Function<FakeQuantizeFunction> {
 public:
  static at::Tensor forward(AutogradContext *ctx, const at::Tensor &x, const at::Tensor &scale,
                            const std::optional<at::Tensor> &zero_point, int64_t qmin, int64_t qmax,
                            double grad_factor, double input_low, double input_high) {
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      out = forward_op().call(x, scale, zero_point, qmin, qmax, grad_factor, input_low, input_high);
    }
    // Only x, the step and the offset are saved; x in its own dtype. They are read again in backward, and
    // autograd's version check refuses them if they were changed in place meanwhile.
    const bool has_offset = zero_point.has_value() && zero_point->defined();
    ctx->save_for_backward({x, scale, has_offset ? *zero_point : at::Tensor()});
    ctx->saved_data["numbers"] = std::vector<double>{static_cast<double>(qmin), static_cast<double>(qmax),
                                                     grad_factor, input_low, input_high};
    ctx->saved_data["has_offset"] = has_offset;
    return out;
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const std::vector<double> n = ctx->saved_data["numbers"].toDoubleVector();
    const bool has_offset = ctx->saved_data["has_offset"].toBool();
    const std::optional<at::Tensor> zero_point = has_offset ? std::optional<at::Tensor>(saved[2]) : std::nullopt;
    const Mask mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1), has_offset && ctx->needs_input_grad(2)};
    auto [grad_x, grad_scale, grad_offset] =
        backward_op().call(grads[0], saved[0], saved[1], zero_point, static_cast<int64_t>(n[0]),
                           static_cast<int64_t>(n[1]), n[2], n[3], n[4], mask);
    // one gradient per forward argument: the numbers get none
    return {mask[0] ? grad_x : at::Tensor(), mask[1] ? grad_scale : at::Tensor(), mask[2] ? grad_offset : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

bool any_requires_grad(const at::Tensor &x, const at::Tensor &scale, const std::optional<at::Tensor> &zero_point) {
  return x.requires_grad() || scale.requires_grad() ||
         (zero_point.has_value() && zero_point->defined() && zero_point->requires_grad());
}

at::Tensor forward_autograd(const at::Tensor &x, const at::Tensor &scale, const std::optional<at::Tensor> &zero_point,
                            int64_t qmin, int64_t qmax, double grad_factor, double input_low, double input_high) {
  if (!at::GradMode::is_enabled() || !any_requires_grad(x, scale, zero_point)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // nothing to record: no node, nothing saved
    return forward_op().call(x, scale, zero_point, qmin, qmax, grad_factor, input_low, input_high);
  }
  return FakeQuantizeFunction::apply(x, scale, zero_point, qmin, qmax, grad_factor, input_low, input_high);
}

class DynamicFunction : public torch::autograd::Function<DynamicFunction> {
 public:
  static at::Tensor forward(AutogradContext *, const at::Tensor &x, int64_t qmin, int64_t qmax, bool symmetric) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return dynamic_op().call(x, qmin, qmax, symmetric);
  }

  // Every value lies inside its own token's range: the gradient passes straight through, and nothing is saved.
  static variable_list backward(AutogradContext *, variable_list grads) {
    return {grads[0], at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor dynamic_autograd(const at::Tensor &x, int64_t qmin, int64_t qmax, bool symmetric) {
  if (!at::GradMode::is_enabled() || !x.requires_grad()) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return dynamic_op().call(x, qmin, qmax, symmetric);
  }
  return DynamicFunction::apply(x, qmin, qmax, symmetric);
}

}  // namespace

TORCH_LIBRARY_IMPL(fxquant, CPU, m) {
  m.impl("fake_quantize", &forward_cpu);
  m.impl("fake_quantize_backward", &backward_cpu);
}

TORCH_LIBRARY_IMPL(fxquant, Autograd, m) {
  m.impl("fake_quantize", &forward_autograd);
  m.impl("fake_quantize_dynamic", &dynamic_autograd);
}
