// The fused CUDA AUNN (fused_step.cu) as PyTorch operators in the aunn_fast namespace (prefix cuda_), mirroring
// the cpp backend's (csrc/cpu/ops.cpp). Their fake implementations and autograd formulas are registered from
// Python (aunn_fast/cuda_backend.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "fused_step.h"

namespace aunn_cuda {
namespace {

using at::Tensor;

struct Model {
  StepProblem problem;
  std::vector<Tensor> params;  // the eight float32 parameters
};

void check_param(const Tensor& t, const char* name, const Tensor& idx) {
  TORCH_CHECK(t.is_cuda() && t.device() == idx.device(), "aunn_fast cuda: ", name, " must be on ", idx.device(),
              ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "aunn_fast cuda: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "aunn_fast cuda: ", name, " must be contiguous");
}

void check_rows(const Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous(), "aunn_fast cuda: ",
              name, " must be a contiguous int64 CUDA vector");
  TORCH_CHECK(t.size(0) == n, "aunn_fast cuda: ", name, " has ", t.size(0), " rows, expected ", n);
}

Model model_of(const Tensor& idx, const Tensor& in_w, const Tensor& in_b, const Tensor& in_g, const Tensor& hw,
               const Tensor& hb, const Tensor& hg, const Tensor& out_w, const Tensor& out_b, int64_t residual_every,
               double eps) {
  check_rows(idx, "idx", idx.numel());
  const char* names[] = {"in_weight", "in_bias", "in_gain", "hidden_weight", "hidden_bias", "hidden_gain",
                         "out_weight", "out_bias"};
  const Tensor* tensors[] = {&in_w, &in_b, &in_g, &hw, &hb, &hg, &out_w, &out_b};
  for (int i = 0; i < 8; ++i) check_param(*tensors[i], names[i], idx);
  TORCH_CHECK(in_w.dim() == 2 && hw.dim() == 3 && out_w.dim() == 2, "aunn_fast cuda: weight ranks must be 2, 3, 2");
  const int64_t h = in_w.size(0), bits = in_w.size(1), layers = hw.size(0), v = out_w.size(0);
  TORCH_CHECK(bits >= 1 && bits <= 64 && residual_every >= 1, "aunn_fast cuda: bad shape");
  TORCH_CHECK(in_b.numel() == h && in_g.numel() == h && hw.size(1) == h && hw.size(2) == h &&
                  hb.numel() == layers * h && hg.numel() == layers * h && out_w.size(1) == h && out_b.numel() == v,
              "aunn_fast cuda: parameter shapes disagree");
  TORCH_CHECK(step_supported(static_cast<int>(h), static_cast<int>(v)),
              "the cuda backend's fused step supports hidden widths 16, 32, 64 and 128 and vocabularies up to 256, "
              "got hidden ",
              h, " and vocabulary ", v, "; use backend='triton'");
  StepProblem p;
  p.n = idx.numel();
  p.hidden = static_cast<int>(h);
  p.hidden_layers = static_cast<int>(layers);
  p.bits = static_cast<int>(bits);
  p.vocab = static_cast<int>(v);
  p.residual_every = static_cast<int>(residual_every);
  p.eps = static_cast<float>(eps);
  return {p, {in_w, in_b, in_g, hw, hb, hg, out_w, out_b}};
}

// The weights rounded to bf16 in the kernel's packed layout (fused_step.h: packed_weight_elements).
Tensor packed_weights(const Model& m) {
  const StepProblem& p = m.problem;
  const int64_t h = p.hidden, layers = p.hidden_layers;
  Tensor packed = at::zeros({packed_weight_elements(p)}, m.params[0].options().dtype(at::kBFloat16));
  packed.narrow(0, 0, h * 64).view({h, 64}).narrow(1, 0, p.bits).copy_(m.params[0]);
  packed.narrow(0, h * 64, layers * h * h).view({layers, h, h}).copy_(m.params[3]);
  packed.narrow(0, h * 64 + layers * h * h, padded_vocab(p.vocab) * h)
      .view({padded_vocab(p.vocab), h})
      .narrow(0, 0, p.vocab)
      .copy_(m.params[6]);
  return packed;
}

StepArgs args_of(const Model& m, const Tensor& idx, const Tensor& packed) {
  StepArgs a;
  a.idx = idx.data_ptr<int64_t>();
  a.weights = reinterpret_cast<const __nv_bfloat16*>(packed.data_ptr<at::BFloat16>());
  a.in_bias = m.params[1].data_ptr<float>();
  a.in_gain = m.params[2].data_ptr<float>();
  a.hidden_bias = m.params[4].data_ptr<float>();
  a.hidden_gain = m.params[5].data_ptr<float>();
  a.out_bias = m.params[7].data_ptr<float>();
  return a;
}

StepPlan plan_of(const Model& m, StepMode mode, const Tensor& idx) {
  StepPlan plan;
  const char* error = plan_step(m.problem, mode, idx.device().index(), &plan);
  TORCH_CHECK(error == nullptr, "aunn_fast cuda: ", error, " (hidden ", m.problem.hidden, ", layers ",
              m.problem.hidden_layers + 2, ", vocabulary ", m.problem.vocab, "); use backend='triton'");
  return plan;
}

void launch(const Model& m, StepMode mode, const StepPlan& plan, const StepArgs& args, const Tensor& idx) {
  const cudaError_t status =
      launch_step(m.problem, mode, plan, args, c10::cuda::getCurrentCUDAStream(idx.device().index()));
  TORCH_CHECK(status == cudaSuccess, "aunn_fast cuda: launching the fused step failed: ", cudaGetErrorString(status));
}

// The per-CTA gradient rows summed into one tensor per parameter.
std::vector<Tensor> reduce_gradients(const Model& m, const Tensor& partials) {
  std::vector<Tensor> out;
  int64_t offset = 0;
  for (const Tensor& param : m.params) {
    Tensor grad = at::empty_like(param);
    Tensor flat = grad.view({-1});
    at::sum_out(flat, partials.narrow(1, offset, param.numel()), {0});
    offset += param.numel();
    out.push_back(grad);
  }
  return out;
}

// The gradients of sum_r weight[r * weight_stride] * loss_r (kLossGrad) or of sum dlogits * logits (kLogitsGrad).
std::vector<Tensor> run_backward(const Model& m, StepMode mode, const Tensor& idx, StepArgs args) {
  const StepPlan plan = plan_of(m, mode, idx);
  Tensor partials = at::zeros({plan.grid, grad_floats(m.problem)}, idx.options().dtype(at::kFloat));
  args.partials = partials.data_ptr<float>();
  launch(m, mode, plan, args, idx);
  return reduce_gradients(m, partials);
}

#define AUNN_PARAMS_DECL                                                                                   \
  const Tensor &in_weight, const Tensor &in_bias, const Tensor &in_gain, const Tensor &hidden_weight,     \
      const Tensor &hidden_bias, const Tensor &hidden_gain, const Tensor &out_weight, const Tensor &out_bias, \
      int64_t residual_every, double eps
#define AUNN_PARAMS_ARGS \
  in_weight, in_bias, in_gain, hidden_weight, hidden_bias, hidden_gain, out_weight, out_bias, residual_every, eps

Tensor cuda_logits(const Tensor& idx, AUNN_PARAMS_DECL) {
  const Model m = model_of(idx, AUNN_PARAMS_ARGS);
  const c10::cuda::CUDAGuard guard(idx.device());
  const Tensor packed = packed_weights(m);
  Tensor out = at::empty({m.problem.n, m.problem.vocab}, idx.options().dtype(at::kFloat));
  StepArgs args = args_of(m, idx, packed);
  args.logits_out = out.data_ptr<float>();
  launch(m, StepMode::kLogits, plan_of(m, StepMode::kLogits, idx), args, idx);
  return out;
}

Tensor cuda_argmax(const Tensor& idx, AUNN_PARAMS_DECL) {
  const Model m = model_of(idx, AUNN_PARAMS_ARGS);
  const c10::cuda::CUDAGuard guard(idx.device());
  const Tensor packed = packed_weights(m);
  Tensor out = at::empty({m.problem.n}, idx.options());
  StepArgs args = args_of(m, idx, packed);
  args.argmax_out = out.data_ptr<int64_t>();
  launch(m, StepMode::kArgmax, plan_of(m, StepMode::kArgmax, idx), args, idx);
  return out;
}

// Row losses [N]; with_grads: also the gradients of their sum, which a backward whose upstream gradient is the
// same for every row (an expanded, stride-0 tensor: the backward of a sum) only scales.
std::tuple<Tensor, std::vector<Tensor>> cuda_loss(const Tensor& idx, const Tensor& targets, AUNN_PARAMS_DECL,
                                                  bool with_grads) {
  const Model m = model_of(idx, AUNN_PARAMS_ARGS);
  const c10::cuda::CUDAGuard guard(idx.device());
  check_rows(targets, "targets", m.problem.n);
  const Tensor packed = packed_weights(m);
  Tensor rows = at::empty({m.problem.n}, idx.options().dtype(at::kFloat));
  StepArgs args = args_of(m, idx, packed);
  args.targets = targets.data_ptr<int64_t>();
  args.row_loss = rows.data_ptr<float>();
  if (!with_grads) {
    launch(m, StepMode::kLoss, plan_of(m, StepMode::kLoss, idx), args, idx);
    return {rows, {}};
  }
  const Tensor one = at::ones({1}, idx.options().dtype(at::kFloat));
  args.row_weight = one.data_ptr<float>();
  args.row_weight_stride = 0;
  std::vector<Tensor> grads = run_backward(m, StepMode::kLossGrad, idx, args);
  return {rows, grads};
}

std::vector<Tensor> cuda_loss_backward(const Tensor& grad, at::TensorList unit_grads, const Tensor& idx,
                                       const Tensor& targets, AUNN_PARAMS_DECL) {
  const Model m = model_of(idx, AUNN_PARAMS_ARGS);
  const c10::cuda::CUDAGuard guard(idx.device());
  TORCH_CHECK(grad.dim() == 1 && grad.numel() == m.problem.n && grad.device() == idx.device(),
              "aunn_fast cuda: the loss gradient must be a vector of ", m.problem.n, " rows on ", idx.device());
  if (unit_grads.size() == 8 && m.problem.n > 0 && grad.stride(0) == 0) {  // the same upstream for every row
    const Tensor scale = grad.select(0, 0).to(at::kFloat);
    std::vector<Tensor> out;
    for (const Tensor& t : unit_grads) out.push_back(t * scale);
    return out;
  }
  check_rows(targets, "targets", m.problem.n);
  const Tensor weights = grad.to(at::kFloat).contiguous();
  const Tensor packed = packed_weights(m);
  StepArgs args = args_of(m, idx, packed);
  Tensor rows = at::empty({m.problem.n}, idx.options().dtype(at::kFloat));  // recomputed, not returned
  args.targets = targets.data_ptr<int64_t>();
  args.row_loss = rows.data_ptr<float>();
  args.row_weight = weights.data_ptr<float>();
  args.row_weight_stride = 1;
  return run_backward(m, StepMode::kLossGrad, idx, args);
}

std::vector<Tensor> cuda_logits_backward(const Tensor& grad, const Tensor& idx, AUNN_PARAMS_DECL) {
  const Model m = model_of(idx, AUNN_PARAMS_ARGS);
  const c10::cuda::CUDAGuard guard(idx.device());
  const Tensor upstream = grad.to(at::kFloat).contiguous();
  TORCH_CHECK(upstream.numel() == m.problem.n * m.problem.vocab && upstream.device() == idx.device(),
              "aunn_fast cuda: the logits gradient must be [", m.problem.n, ", ", m.problem.vocab, "] on ",
              idx.device());
  const Tensor packed = packed_weights(m);
  StepArgs args = args_of(m, idx, packed);
  args.dlogits_in = upstream.data_ptr<float>();
  return run_backward(m, StepMode::kLogitsGrad, idx, args);
}

}  // namespace

#define AUNN_PARAMS_SCHEMA                                                                                \
  "Tensor in_weight, Tensor in_bias, Tensor in_gain, Tensor hidden_weight, Tensor hidden_bias, "         \
  "Tensor hidden_gain, Tensor out_weight, Tensor out_bias, int residual_every, float eps"

// FRAGMENT: the namespace is shared with the Triton operators (Python) and the cpp backend's (csrc/cpu).
TORCH_LIBRARY_FRAGMENT(aunn_fast, m) {
  m.def("cuda_logits(Tensor idx, " AUNN_PARAMS_SCHEMA ") -> Tensor");
  m.def("cuda_argmax(Tensor idx, " AUNN_PARAMS_SCHEMA ") -> Tensor");
  m.def("cuda_loss(Tensor idx, Tensor targets, " AUNN_PARAMS_SCHEMA ", bool with_grads) -> (Tensor, Tensor[])");
  m.def("cuda_loss_backward(Tensor grad, Tensor[] unit_grads, Tensor idx, Tensor targets, " AUNN_PARAMS_SCHEMA
        ") -> Tensor[]");
  m.def("cuda_logits_backward(Tensor grad, Tensor idx, " AUNN_PARAMS_SCHEMA ") -> Tensor[]");
}

TORCH_LIBRARY_IMPL(aunn_fast, CUDA, m) {
  m.impl("cuda_logits", &cuda_logits);
  m.impl("cuda_argmax", &cuda_argmax);
  m.impl("cuda_loss", &cuda_loss);
  m.impl("cuda_loss_backward", &cuda_loss_backward);
  m.impl("cuda_logits_backward", &cuda_logits_backward);
}

}  // namespace aunn_cuda
