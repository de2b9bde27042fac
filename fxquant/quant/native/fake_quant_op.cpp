// fxquant's eager fake-quant op: the passes of fake_quant.c behind torch's dispatcher, with the autograd node in C++.
//
// Why: in eager mode a quantizer's fixed cost per call, not its passes over memory, is most of what W4A4 adds to a
// small-batch CNN step (mobilenet_v2 has 106 quantizers; on 2×3×32×32 images its W4A4 step costs 24 ms more than
// FP's, on 32×3×64×64 images 27 ms). A Python autograd.Function calling the C passes through ctypes pays for the
// Python node, the ctypes marshalling and a Python backward on every call; this op pays for one dispatcher call
// forward and a C++ node backward (benchmarks/overhead.py measures both, side by side).
//
// The op, fxquant::fake_quantize_eager, is registered for Autograd (a torch::autograd::Function) and for CPU (the
// forward alone: inference mode, or a caller below autograd). Its arguments are those of fake_quant.c's passes:
// the integer clamp range after the offset shift (low, high), the straight-through mask's open bounds (below,
// above), the smallest step applied, LSQ's gradient factor and the fused input clamp (-inf, +inf: none), all
// computed by fxquant/quant/native_kernel.py's native_grid. zero_point is only the tensor its gradient goes to: its
// rounded value is already folded into low and high. The values and gradients are those of the ctypes path, bit
// for bit, since both run the same C passes.
//
// Built and loaded by fxquant/quant/native_build.py (linked with fake_quant.c compiled as C into an object).
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

extern "C" {
void fxq_forward(const float *x, float *out, int64_t rows, int64_t inner, const float *scale, float min_step,
                 float low, float high, float in_low, float in_high, int threads);
int fxq_backward(const float *grad, const float *x, float *grad_x, int64_t rows, int64_t inner, const float *scale,
                 float min_step, float low, float high, float below, float above, float in_low, float in_high,
                 float grad_factor, float *grad_scale, float *grad_offset, int threads);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct Grid {
  double low, high, below, above, min_step, grad_factor, input_low, input_high;
};

// The layout in which x is dense with dim 0 outermost (contiguous or channels-last), as native_kernel.dense_format
// decides: the passes run over storage in that order, one row per step along dim 0.
std::optional<at::MemoryFormat> dense_format(const at::Tensor &x) {
  if (x.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) return at::MemoryFormat::ChannelsLast3d;
  return std::nullopt;
}

// What the passes assume, checked on every call: a wrong caller gets an error, not a read past a buffer.
void check_arguments(const at::Tensor &x, const at::Tensor &scale, const std::optional<at::Tensor> &zero_point) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "fxquant::fake_quantize_eager: x must be a "
              "float32 CPU tensor, got ", x.scalar_type(), " on ", x.device());
  TORCH_CHECK(dense_format(x).has_value(), "fxquant::fake_quantize_eager: x must be contiguous or channels-last");
  TORCH_CHECK(scale.device().is_cpu() && scale.scalar_type() == at::kFloat && scale.is_contiguous(),
              "fxquant::fake_quantize_eager: scale must be a contiguous float32 CPU tensor");
  const int64_t rows = scale.numel();
  TORCH_CHECK(x.numel() > 0 && rows > 0 && (rows == 1 || (x.dim() > 0 && x.size(0) == rows)),
              "fxquant::fake_quantize_eager: scale must hold one step, or one per row of x along dim 0 (x ",
              x.sizes(), ", scale ", scale.sizes(), ")");
  TORCH_CHECK(!zero_point.has_value() || zero_point->numel() == 1,
              "fxquant::fake_quantize_eager: zero_point must hold one offset (per-row offsets are not supported)");
}

at::Tensor forward_pass(const at::Tensor &x, const at::Tensor &scale, const Grid &g) {
  at::Tensor out = at::empty_like(x);  // x is dense: the same strides, so the same storage order
  const int64_t rows = scale.numel();
  fxq_forward(x.const_data_ptr<float>(), out.mutable_data_ptr<float>(), rows, x.numel() / rows,
              scale.const_data_ptr<float>(), g.min_step, g.low, g.high, g.input_low, g.input_high,
              at::get_num_threads());
  return out;
}

class FakeQuantizeFunction : public torch::autograd::Function<FakeQuantizeFunction> {
 public:
  static at::Tensor forward(AutogradContext *ctx, const at::Tensor &x, const at::Tensor &scale,
                            const std::optional<at::Tensor> &zero_point, double low, double high, double below,
                            double above, double min_step, double grad_factor, double input_low,
                            double input_high) {
    const Grid g{low, high, below, above, min_step, grad_factor, input_low, input_high};
    at::Tensor out = forward_pass(x, scale, g);
    // Only x and the step are saved: the quantized value is recomputed from x in the backward pass. The step is
    // read again there, and autograd's version check refuses it if it was changed in place meanwhile.
    ctx->save_for_backward({x, scale});
    ctx->saved_data["grid"] = std::vector<double>{low, high, below, above, min_step, grad_factor, input_low,
                                                  input_high};
    ctx->saved_data["has_offset"] = zero_point.has_value() && zero_point->defined();
    return out;
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &scale = saved[1];
    const std::vector<double> v = ctx->saved_data["grid"].toDoubleVector();
    const Grid g{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]};
    const bool has_offset = ctx->saved_data["has_offset"].toBool();
    // needs_input_grad counts the tensor inputs that were given: x, scale and, with an offset, zero_point.
    const bool want_scale = ctx->needs_input_grad(1);
    const bool want_offset = has_offset && ctx->needs_input_grad(2);
    const at::Tensor grad = grads[0].contiguous(*dense_format(x));  // brought to x's storage order
    const int64_t rows = scale.numel();
    at::Tensor grad_x = at::empty_like(x);
    at::Tensor grad_scale = want_scale ? at::empty_like(scale) : at::Tensor();
    at::Tensor grad_offset = want_offset ? at::empty_like(scale) : at::Tensor();
    const int status = fxq_backward(
        grad.const_data_ptr<float>(), x.const_data_ptr<float>(), grad_x.mutable_data_ptr<float>(), rows,
        x.numel() / rows, scale.const_data_ptr<float>(), g.min_step, g.low, g.high, g.below, g.above, g.input_low,
        g.input_high, g.grad_factor, want_scale ? grad_scale.mutable_data_ptr<float>() : nullptr,
        want_offset ? grad_offset.mutable_data_ptr<float>() : nullptr, at::get_num_threads());
    TORCH_CHECK(status == 0, "fxquant's native kernel could not allocate sums for ", rows, " rows");
    // one gradient per forward argument: the numbers get none
    return {ctx->needs_input_grad(0) ? grad_x : at::Tensor(), grad_scale, grad_offset, at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor fake_quantize_autograd(const at::Tensor &x, const at::Tensor &scale,
                                  const std::optional<at::Tensor> &zero_point, double low, double high, double below,
                                  double above, double min_step, double grad_factor, double input_low,
                                  double input_high) {
  check_arguments(x, scale, zero_point);
  return FakeQuantizeFunction::apply(x, scale, zero_point, low, high, below, above, min_step, grad_factor,
                                     input_low, input_high);
}

at::Tensor fake_quantize_cpu(const at::Tensor &x, const at::Tensor &scale, const std::optional<at::Tensor> &zero_point,
                             double low, double high, double below, double above, double min_step,
                             double grad_factor, double input_low, double input_high) {
  check_arguments(x, scale, zero_point);
  return forward_pass(x, scale, Grid{low, high, below, above, min_step, grad_factor, input_low, input_high});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fxquant, m) {
  m.def(
      "fake_quantize_eager(Tensor x, Tensor scale, Tensor? zero_point, float low, float high, float below, "
      "float above, float min_step, float grad_factor, float input_low, float input_high) -> Tensor");
}

TORCH_LIBRARY_IMPL(fxquant, Autograd, m) { m.impl("fake_quantize_eager", &fake_quantize_autograd); }

TORCH_LIBRARY_IMPL(fxquant, CPU, m) { m.impl("fake_quantize_eager", &fake_quantize_cpu); }
