// The fused CPU AUNN as PyTorch operators in the aunn_fast namespace (prefix cpp_). Their fake (meta)
// implementations and autograd formulas are registered from Python (aunn_fast/cpp_backend.py).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "mlp.h"
#include "tile.h"

namespace aunn_cpu {
namespace {

using at::Tensor;

struct Model {
  Params params;
  Shape shape;
};

void check_param(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "aunn_fast cpp: ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "aunn_fast cpp: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "aunn_fast cpp: ", name, " must be contiguous");
}

void check_rows(const Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous(),
              "aunn_fast cpp: ", name, " must be a contiguous int64 CPU vector");
  TORCH_CHECK(t.size(0) == n, "aunn_fast cpp: ", name, " has ", t.size(0), " rows, expected ", n);
}

Model model_of(const Tensor& in_w, const Tensor& in_b, const Tensor& in_g, const Tensor& hw, const Tensor& hb,
               const Tensor& hg, const Tensor& out_w, const Tensor& out_b, int64_t residual_every, double eps,
               bool bf16) {
  const char* names[] = {"in_weight", "in_bias", "in_gain", "hidden_weight", "hidden_bias", "hidden_gain",
                         "out_weight", "out_bias"};
  const Tensor* tensors[] = {&in_w, &in_b, &in_g, &hw, &hb, &hg, &out_w, &out_b};
  for (int i = 0; i < 8; ++i) check_param(*tensors[i], names[i]);
  TORCH_CHECK(in_w.dim() == 2 && hw.dim() == 3 && out_w.dim() == 2, "aunn_fast cpp: weight ranks must be 2, 3, 2");
  const int64_t h = in_w.size(0), bits = in_w.size(1), n = hw.size(0), v = out_w.size(0);
  TORCH_CHECK(!bf16 || AUNN_HAS_BF16,
              "aunn_fast cpp: bf16 needs AVX512-BF16 instructions, which this build's target (-march) lacks");
  TORCH_CHECK(bits >= 1 && bits <= 64 && h >= 1 && v >= 1 && residual_every >= 1, "aunn_fast cpp: bad shape");
  TORCH_CHECK(in_b.numel() == h && in_g.numel() == h && hw.size(1) == h && hw.size(2) == h &&
                  hb.numel() == n * h && hg.numel() == n * h && out_w.size(1) == h && out_b.numel() == v,
              "aunn_fast cpp: parameter shapes disagree");
  Params p{in_w.data_ptr<float>(), in_b.data_ptr<float>(), in_g.data_ptr<float>(), hw.data_ptr<float>(),
           hb.data_ptr<float>(),   hg.data_ptr<float>(),   out_w.data_ptr<float>(), out_b.data_ptr<float>()};
  return {p, Shape{h, v, bits, n, residual_every, static_cast<float>(eps), bf16}};
}

void check_targets(const Tensor& targets, int64_t vocab) {
  if (targets.numel() == 0) return;
  const int64_t* t = targets.data_ptr<int64_t>();
  for (int64_t i = 0; i < targets.numel(); ++i)
    TORCH_CHECK(t[i] >= 0 && t[i] < vocab, "aunn_fast cpp: target ", t[i], " outside 0..", vocab - 1);
}

Job make_job(const Tensor& idx, Mode mode) {
  check_rows(idx, "idx", idx.numel());
  Job job{};
  job.idx = idx.data_ptr<int64_t>();
  job.n = idx.numel();
  job.mode = mode;
  return job;
}

std::vector<Tensor> gradients_as_tensors(const Packed& packed, const std::vector<float>& grads,
                                         const std::vector<Tensor>& like) {
  std::vector<Tensor> out;
  float* ptrs[8];
  for (int i = 0; i < 8; ++i) {
    out.push_back(at::empty_like(like[i]));
    ptrs[i] = out.back().data_ptr<float>();
  }
  unpack_gradients(packed, grads, ptrs);
  return out;
}

#define AUNN_PARAMS_DECL                                                                                   \
  const Tensor &in_weight, const Tensor &in_bias, const Tensor &in_gain, const Tensor &hidden_weight,     \
      const Tensor &hidden_bias, const Tensor &hidden_gain, const Tensor &out_weight, const Tensor &out_bias, \
      int64_t residual_every, double eps, bool bf16
#define AUNN_PARAMS_ARGS \
  in_weight, in_bias, in_gain, hidden_weight, hidden_bias, hidden_gain, out_weight, out_bias, residual_every, eps, bf16
#define AUNN_PARAM_LIST \
  std::vector<Tensor> { in_weight, in_bias, in_gain, hidden_weight, hidden_bias, hidden_gain, out_weight, out_bias }

Tensor cpp_logits(const Tensor& idx, AUNN_PARAMS_DECL) {
  const Model m = model_of(AUNN_PARAMS_ARGS);
  const Packed packed(m.params, m.shape, false);
  Job job = make_job(idx, Mode::kLogits);
  Tensor out = at::empty({job.n, m.shape.vocab}, idx.options().dtype(at::kFloat));
  job.out_float = out.data_ptr<float>();
  run(packed, job);
  return out;
}

Tensor cpp_argmax(const Tensor& idx, AUNN_PARAMS_DECL) {
  const Model m = model_of(AUNN_PARAMS_ARGS);
  const Packed packed(m.params, m.shape, false);
  Job job = make_job(idx, Mode::kArgmax);
  Tensor out = at::empty({job.n}, idx.options());
  job.out_index = out.data_ptr<int64_t>();
  run(packed, job);
  return out;
}

// Row losses [N]; with_grads: also the gradients of their sum (a backward whose upstream is the same for every
// row, as "mean" and "sum" give, scales them instead of running again).
std::tuple<Tensor, std::vector<Tensor>> cpp_loss(const Tensor& idx, const Tensor& targets, AUNN_PARAMS_DECL,
                                                 bool with_grads) {
  const Model m = model_of(AUNN_PARAMS_ARGS);
  const Packed packed(m.params, m.shape, with_grads);
  Job job = make_job(idx, Mode::kLoss);
  check_rows(targets, "targets", job.n);
  check_targets(targets, m.shape.vocab);
  Tensor rows = at::empty({job.n}, idx.options().dtype(at::kFloat));
  const float one = 1.0f;
  job.targets = targets.data_ptr<int64_t>();
  job.out_float = rows.data_ptr<float>();
  job.backward = with_grads;
  job.grad = &one;
  job.grad_stride = 0;
  const std::vector<float>& grads = run(packed, job);
  if (!with_grads) return {rows, {}};
  return {rows, gradients_as_tensors(packed, grads, AUNN_PARAM_LIST)};
}

std::vector<Tensor> cpp_loss_backward(const Tensor& grad, at::TensorList unit_grads, const Tensor& idx,
                                      const Tensor& targets, AUNN_PARAMS_DECL) {
  const Model m = model_of(AUNN_PARAMS_ARGS);
  const Tensor g = grad.to(at::kFloat).contiguous();
  TORCH_CHECK(g.numel() == idx.numel(), "aunn_fast cpp: loss gradient has ", g.numel(), " rows, expected ",
              idx.numel());
  const float* gp = g.data_ptr<float>();
  bool uniform = unit_grads.size() == 8 && g.numel() > 0;
  for (int64_t i = 1; uniform && i < g.numel(); ++i) uniform = gp[i] == gp[0];
  if (uniform) {
    std::vector<Tensor> out;
    for (const Tensor& t : unit_grads) out.push_back(t * gp[0]);
    return out;
  }
  const Packed packed(m.params, m.shape, true);
  Job job = make_job(idx, Mode::kLoss);
  check_rows(targets, "targets", job.n);
  check_targets(targets, m.shape.vocab);
  job.targets = targets.data_ptr<int64_t>();
  job.backward = true;
  job.grad = gp;
  job.grad_stride = 1;
  return gradients_as_tensors(packed, run(packed, job), AUNN_PARAM_LIST);
}

std::vector<Tensor> cpp_logits_backward(const Tensor& grad, const Tensor& idx, AUNN_PARAMS_DECL) {
  const Model m = model_of(AUNN_PARAMS_ARGS);
  const Packed packed(m.params, m.shape, true);
  Job job = make_job(idx, Mode::kLogits);
  const Tensor g = grad.to(at::kFloat).contiguous();
  TORCH_CHECK(g.numel() == job.n * m.shape.vocab, "aunn_fast cpp: logits gradient has the wrong size");
  job.backward = true;
  job.grad = g.data_ptr<float>();
  return gradients_as_tensors(packed, run(packed, job), AUNN_PARAM_LIST);
}

// torch.nn.utils.clip_grad_norm_'s clipping, in place: the eight gradients' total 2-norm (each tensor's norm,
// then the norm of those) and, where it exceeds max_norm, every gradient times max_norm / (norm + 1e-6).
void clip_total_norm(float* const grads[8], at::TensorList params, double max_norm) {
  double total = 0.0;
  for (int i = 0; i < 8; ++i) {
    const int64_t n = params[i].numel();
    double sum = 0.0;
    for (int64_t j = 0; j < n; ++j) sum += static_cast<double>(grads[i][j]) * grads[i][j];
    total += sum;
  }
  const float coef = static_cast<float>(max_norm / (std::sqrt(total) + 1e-6));
  if (!(coef < 1.0f)) return;  // at or below the limit; a NaN norm also leaves the gradients (and the loss) as they are
  for (int i = 0; i < 8; ++i) {
    const int64_t n = params[i].numel();
    for (int64_t j = 0; j < n; ++j) grads[i][j] *= coef;
  }
}

// One optimizer step on the mean loss of (idx, targets), in place: AdamW (torch.optim.AdamW's update: decoupled
// weight decay, no amsgrad; weight_decay 0 is torch.optim.Adam's) when exp_avg holds the eight moment buffers,
// plain SGD when it is empty. max_norm > 0 first clips the gradients' total norm to max_norm as
// torch.nn.utils.clip_grad_norm_ does (<= 0: no clipping). `step` is the step's 1-based number (bias
// correction). Writes the gradients the update used (clipped) into `grads` (eight parameter-shaped buffers)
// and returns the mean loss before the update.
Tensor cpp_train_step(const Tensor& idx, const Tensor& targets, at::TensorList params, at::TensorList grads_out,
                      at::TensorList exp_avg, at::TensorList exp_avg_sq, int64_t step, double lr, double beta1,
                      double beta2, double adam_eps, double weight_decay, double max_norm, int64_t residual_every,
                      double eps, bool bf16) {
  TORCH_CHECK(params.size() == 8 && grads_out.size() == 8, "aunn_fast cpp: expected eight parameters and grads");
  const bool adam = !exp_avg.empty();
  TORCH_CHECK(!adam || (exp_avg.size() == 8 && exp_avg_sq.size() == 8 && step >= 1),
              "aunn_fast cpp: Adam needs eight exp_avg and exp_avg_sq buffers and step >= 1");
  TORCH_CHECK(adam || weight_decay == 0.0, "aunn_fast cpp: weight decay is only implemented for AdamW");
  const Model m = model_of(params[0], params[1], params[2], params[3], params[4], params[5], params[6],
                           params[7], residual_every, eps, bf16);
  const Packed packed(m.params, m.shape, true);
  Job job = make_job(idx, Mode::kLoss);
  check_rows(targets, "targets", job.n);
  check_targets(targets, m.shape.vocab);
  Tensor rows = at::empty({job.n}, idx.options().dtype(at::kFloat));
  const float weight = job.n > 0 ? 1.0f / static_cast<float>(job.n) : 0.0f;
  job.targets = targets.data_ptr<int64_t>();
  job.out_float = rows.data_ptr<float>();
  job.backward = true;
  job.grad = &weight;
  job.grad_stride = 0;
  const std::vector<float>& packed_grads = run(packed, job);
  float* grad_ptrs[8];
  for (int i = 0; i < 8; ++i) {
    check_param(grads_out[i], "grads");
    TORCH_CHECK(grads_out[i].sizes() == params[i].sizes(), "aunn_fast cpp: grads must be shaped as the params");
    grad_ptrs[i] = grads_out[i].data_ptr<float>();
  }
  unpack_gradients(packed, packed_grads, grad_ptrs);
  if (max_norm > 0.0) clip_total_norm(grad_ptrs, params, max_norm);
  const double bias1 = adam ? 1.0 - std::pow(beta1, step) : 1.0;
  const double bias2_sqrt = adam ? std::sqrt(1.0 - std::pow(beta2, step)) : 1.0;
  const float step_size = static_cast<float>(lr / bias1);
  for (int i = 0; i < 8; ++i) {
    float* p = params[i].data_ptr<float>();
    const float* g = grad_ptrs[i];
    const int64_t n = params[i].numel();
    if (!adam) {
      for (int64_t j = 0; j < n; ++j) p[j] -= static_cast<float>(lr) * g[j];
      continue;
    }
    check_param(exp_avg[i], "exp_avg");
    check_param(exp_avg_sq[i], "exp_avg_sq");
    TORCH_CHECK(exp_avg[i].numel() == n && exp_avg_sq[i].numel() == n, "aunn_fast cpp: moment shapes");
    float* m1 = exp_avg[i].data_ptr<float>();
    float* m2 = exp_avg_sq[i].data_ptr<float>();
    const float b1 = static_cast<float>(beta1), b2 = static_cast<float>(beta2);
    const float decay = static_cast<float>(1.0 - lr * weight_decay);
    for (int64_t j = 0; j < n; ++j) {
      p[j] *= decay;
      m1[j] += (g[j] - m1[j]) * (1.0f - b1);
      m2[j] = m2[j] * b2 + (1.0f - b2) * g[j] * g[j];
      const float denom = std::sqrt(m2[j]) / static_cast<float>(bias2_sqrt) + static_cast<float>(adam_eps);
      p[j] -= step_size * m1[j] / denom;
    }
  }
  double total = 0.0;  // the mean without another operator's dispatch (a prompt's step is mostly overhead)
  for (int64_t i = 0; i < job.n; ++i) total += job.out_float[i];
  return at::scalar_tensor(job.n > 0 ? total / static_cast<double>(job.n) : NAN, idx.options().dtype(at::kFloat));
}

// Whether this build runs the bf16 precision (its -march target has AVX512-BF16).
bool cpp_has_bf16() { return AUNN_HAS_BF16 != 0; }

}  // namespace

#define AUNN_PARAMS_SCHEMA                                                                                \
  "Tensor in_weight, Tensor in_bias, Tensor in_gain, Tensor hidden_weight, Tensor hidden_bias, "         \
  "Tensor hidden_gain, Tensor out_weight, Tensor out_bias, int residual_every, float eps, bool bf16"

// FRAGMENT: the namespace is shared with the Triton operators, which Python's torch.library defines.
TORCH_LIBRARY_FRAGMENT(aunn_fast, m) {
  m.def("cpp_logits(Tensor idx, " AUNN_PARAMS_SCHEMA ") -> Tensor");
  m.def("cpp_argmax(Tensor idx, " AUNN_PARAMS_SCHEMA ") -> Tensor");
  m.def("cpp_loss(Tensor idx, Tensor targets, " AUNN_PARAMS_SCHEMA ", bool with_grads) -> (Tensor, Tensor[])");
  m.def("cpp_loss_backward(Tensor grad, Tensor[] unit_grads, Tensor idx, Tensor targets, " AUNN_PARAMS_SCHEMA
        ") -> Tensor[]");
  m.def("cpp_logits_backward(Tensor grad, Tensor idx, " AUNN_PARAMS_SCHEMA ") -> Tensor[]");
  m.def("cpp_train_step(Tensor idx, Tensor targets, Tensor(a!)[] params, Tensor(b!)[] grads, "
        "Tensor(c!)[] exp_avg, Tensor(d!)[] exp_avg_sq, int step, float lr, float beta1, float beta2, "
        "float adam_eps, float weight_decay, float max_norm, int residual_every, float eps, bool bf16) -> Tensor");
  m.def("cpp_has_bf16() -> bool", &cpp_has_bf16);  // no tensor to dispatch on: one kernel for every key
}

TORCH_LIBRARY_IMPL(aunn_fast, CPU, m) {
  m.impl("cpp_logits", &cpp_logits);
  m.impl("cpp_argmax", &cpp_argmax);
  m.impl("cpp_loss", &cpp_loss);
  m.impl("cpp_loss_backward", &cpp_loss_backward);
  m.impl("cpp_logits_backward", &cpp_logits_backward);
  m.impl("cpp_train_step", &cpp_train_step);
}

}  // namespace aunn_cpu
