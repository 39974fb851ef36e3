// The fused CPU AUNN as PyTorch operators in the aunn_fast namespace (prefix cpp_). Their fake (meta)
// implementations and autograd formulas are registered from Python (aunn_fast/cpp_backend.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cfloat>
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

// Parameter rows (ParamRows) per task where threads share the gradients' sum and the update: a few hidden rows
// each, so that both halves of a small model's rows go to two threads.
constexpr int64_t kRowGrain = 16;

// f(begin, end) over the parameter rows: shared among torch's threads where more than one thread ran blocks
// (`parts` of the run), else in this thread, whose cache holds the one part (a prompt's few rows in one block).
template <class F>
void for_param_rows(const ParamRows& rows, const GradientParts& parts, F&& f) {
  if (parts.size() < 2) {
    f(int64_t{0}, rows.total);
    return;
  }
  at::parallel_for(0, rows.total, kRowGrain, f);
}

// The gradients summed over parts into out (eight parameter-shaped buffers); then(rows, begin, end) on the rows
// just summed, in the thread that summed them.
template <class F>
void sum_gradients(const Shape& s, const ParamRows& rows, const GradientParts& parts, float* const out[8], F&& then) {
  for_param_rows(rows, parts, [&](int64_t begin, int64_t end) {
    sum_gradient_rows(s, parts, begin, end, out);
    then(rows, begin, end);
  });
}

std::vector<Tensor> gradients_as_tensors(const Shape& s, const GradientParts& parts, const std::vector<Tensor>& like) {
  std::vector<Tensor> out;
  float* ptrs[8];
  for (int i = 0; i < 8; ++i) {
    out.push_back(at::empty_like(like[i]));
    ptrs[i] = out.back().data_ptr<float>();
  }
  sum_gradients(s, ParamRows(s), parts, ptrs, [](const ParamRows&, int64_t, int64_t) {});
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
  Job job = make_job(idx, Mode::kLogits);
  Tensor out = at::empty({job.n, m.shape.vocab}, idx.options().dtype(at::kFloat));
  job.out_float = out.data_ptr<float>();
  run(m.params, m.shape, job);
  return out;
}

Tensor cpp_argmax(const Tensor& idx, AUNN_PARAMS_DECL) {
  const Model m = model_of(AUNN_PARAMS_ARGS);
  Job job = make_job(idx, Mode::kArgmax);
  Tensor out = at::empty({job.n}, idx.options());
  job.out_index = out.data_ptr<int64_t>();
  run(m.params, m.shape, job);
  return out;
}

// Row losses [N]; with_grads: also the gradients of their sum (a backward whose upstream is the same for every
// row, as "mean" and "sum" give, scales them instead of running again).
std::tuple<Tensor, std::vector<Tensor>> cpp_loss(const Tensor& idx, const Tensor& targets, AUNN_PARAMS_DECL,
                                                 bool with_grads) {
  const Model m = model_of(AUNN_PARAMS_ARGS);
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
  const GradientParts& parts = run(m.params, m.shape, job);
  if (!with_grads) return {rows, {}};
  return {rows, gradients_as_tensors(m.shape, parts, AUNN_PARAM_LIST)};
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
  Job job = make_job(idx, Mode::kLoss);
  check_rows(targets, "targets", job.n);
  check_targets(targets, m.shape.vocab);
  job.targets = targets.data_ptr<int64_t>();
  job.backward = true;
  job.grad = gp;
  job.grad_stride = 1;
  return gradients_as_tensors(m.shape, run(m.params, m.shape, job), AUNN_PARAM_LIST);
}

std::vector<Tensor> cpp_logits_backward(const Tensor& grad, const Tensor& idx, AUNN_PARAMS_DECL) {
  const Model m = model_of(AUNN_PARAMS_ARGS);
  Job job = make_job(idx, Mode::kLogits);
  const Tensor g = grad.to(at::kFloat).contiguous();
  TORCH_CHECK(g.numel() == job.n * m.shape.vocab, "aunn_fast cpp: logits gradient has the wrong size");
  job.backward = true;
  job.grad = g.data_ptr<float>();
  return gradients_as_tensors(m.shape, run(m.params, m.shape, job), AUNN_PARAM_LIST);
}

// The sum of x[j]^2 over n floats, in double (eight independent sums, which the compiler vectorises).
double sum_of_squares(const float* x, int64_t n) {
  double part[8] = {};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int k = 0; k < 8; ++k) part[k] += static_cast<double>(x[j + k]) * x[j + k];
  for (; j < n; ++j) part[0] += static_cast<double>(x[j]) * x[j];
  double total = 0.0;
  for (double v : part) total += v;
  return total;
}

// torch.nn.utils.clip_grad_norm_'s clipping, in place: the eight gradients' total 2-norm (each tensor's norm,
// then the norm of those) and, where it exceeds max_norm, every gradient times max_norm / (norm + 1e-6).
void clip_total_norm(float* const grads[8], at::TensorList params, double max_norm) {
  double total = 0.0;
  for (int i = 0; i < 8; ++i) total += sum_of_squares(grads[i], params[i].numel());
  const float coef = static_cast<float>(max_norm / (std::sqrt(total) + 1e-6));
  if (!(coef < 1.0f)) return;  // at or below the limit; a NaN norm also leaves the gradients (and the loss) as they are
  for (int i = 0; i < 8; ++i) {
    const int64_t n = params[i].numel();
    for (int64_t j = 0; j < n; ++j) grads[i][j] *= coef;
  }
}

// sqrt(x) and 1 / x per lane, within a few float32 ulps, without the divider: the estimate instructions and one
// Newton step (an Adam step over every weight is otherwise two divisions and a square root per vector, the divider
// busy for ~30 cycles per 16 floats). sqrt keeps 0 and +inf; NaN stays NaN; subnormals are zero here
// (FlushSubnormals).
#if defined(__AVX512F__)
inline VecF rsqrt_estimate(VecF x) { return (VecF)_mm512_rsqrt14_ps((__m512)x); }
inline VecF rcp_estimate(VecF x) { return (VecF)_mm512_rcp14_ps((__m512)x); }
#elif defined(__AVX__)
inline VecF rsqrt_estimate(VecF x) { return (VecF)_mm256_rsqrt_ps((__m256)x); }
inline VecF rcp_estimate(VecF x) { return (VecF)_mm256_rcp_ps((__m256)x); }
#else
inline VecF rsqrt_estimate(VecF x) {
  for (int i = 0; i < kVectorFloats; ++i) x[i] = 1.0f / std::sqrt(x[i]);
  return x;
}
inline VecF rcp_estimate(VecF x) { return splat(1.0f) / x; }
#endif

inline VecF fast_sqrt(VecF x) {
  VecF r = rsqrt_estimate(x);
  r = r * (splat(1.5f) - splat(0.5f) * x * r * r);
  return (x > splat(0.0f) && x < splat(INFINITY)) ? x * r : x;
}

inline VecF fast_reciprocal(VecF x) {
  const VecF r = rcp_estimate(x);
  return r + r * (splat(1.0f) - x * r);
}

// Subnormal inputs and results read and written as zero while it lives (x86's DAZ and FTZ), restored after. A
// long run's moments decay into subnormals, where every operation would take a microcode assist (a 2-index
// prompt's step measured ~3x slower after 150,000 steps); their values, under 1.2e-38, move no weight.
class FlushSubnormals {
 public:
#if defined(__SSE__)
  FlushSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }
  ~FlushSubnormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#endif
};

// The optimizer's constants for one step.
struct Update {
  bool adam;
  float lr, b1, b2, eps, decay;  // decay: 1 - lr * weight_decay
  float step_size, inv_bias2_sqrt;  // lr / (1 - beta1^step), 1 / sqrt(1 - beta2^step)
};

// One AdamW (torch.optim.AdamW's formulas, the divisions as multiplications by reciprocals) or SGD update of n
// parameters, in place.
void update_parameters(const Update& u, float* p, const float* g, float* m1, float* m2, int64_t n) {
  int64_t j = 0;
  if (!u.adam) {
    for (; j + kVectorFloats <= n; j += kVectorFloats) store(p + j, load(p + j) - u.lr * load(g + j));
    for (; j < n; ++j) p[j] -= u.lr * g[j];
    return;
  }
  for (; j + kVectorFloats <= n; j += kVectorFloats) {
    const VecF gv = load(g + j), m1v = load(m1 + j) + (gv - load(m1 + j)) * (1.0f - u.b1);
    const VecF m2v = load(m2 + j) * u.b2 + (1.0f - u.b2) * gv * gv;
    const VecF denom = fast_sqrt(m2v) * u.inv_bias2_sqrt + u.eps;
    store(m1 + j, m1v);
    store(m2 + j, m2v);
    store(p + j, load(p + j) * u.decay - u.step_size * m1v * fast_reciprocal(denom));
  }
  for (; j < n; ++j) {
    m1[j] += (g[j] - m1[j]) * (1.0f - u.b1);
    m2[j] = m2[j] * u.b2 + (1.0f - u.b2) * g[j] * g[j];
    const float denom = std::sqrt(m2[j]) * u.inv_bias2_sqrt + u.eps;
    p[j] = p[j] * u.decay - u.step_size * m1[j] / denom;
  }
}

// Eight parameter-shaped float32 buffers named `name`: eight tensors shaped as the parameters, or one tensor
// holding the eight back to back (a prompt's step passes three tensors instead of 24: each costs dispatch time).
std::array<float*, 8> buffers_like(at::TensorList list, at::TensorList params, const char* name) {
  std::array<float*, 8> out{};
  int64_t total = 0;
  for (const Tensor& p : params) total += p.numel();
  if (list.size() == 1) {
    check_param(list[0], name);
    TORCH_CHECK(list[0].numel() == total, "aunn_fast cpp: a single ", name, " buffer must hold ", total,
                " floats, got ", list[0].numel());
    float* at = list[0].data_ptr<float>();
    for (int i = 0; i < 8; ++i) {
      out[i] = at;
      at += params[i].numel();
    }
    return out;
  }
  TORCH_CHECK(list.size() == 8, "aunn_fast cpp: expected eight ", name, " buffers or one, got ", list.size());
  for (int i = 0; i < 8; ++i) {
    check_param(list[i], name);
    TORCH_CHECK(list[i].sizes() == params[i].sizes(), "aunn_fast cpp: ", name, " must be shaped as the params");
    out[i] = list[i].data_ptr<float>();
  }
  return out;
}

// One optimizer step on the mean loss of (idx, targets), in place: AdamW (torch.optim.AdamW's update: decoupled
// weight decay, no amsgrad; weight_decay 0 is torch.optim.Adam's) when exp_avg holds the eight moment buffers,
// plain SGD when it is empty. max_norm > 0 first clips the gradients' total norm to max_norm as
// torch.nn.utils.clip_grad_norm_ does (<= 0: no clipping). `step` is the step's 1-based number (bias
// correction). Writes the gradients the update used (clipped) into `grads` and returns the mean loss before the
// update. grads, exp_avg and exp_avg_sq: each eight parameter-shaped buffers or one holding them back to back
// (buffers_like).
Tensor cpp_train_step(const Tensor& idx, const Tensor& targets, at::TensorList params, at::TensorList grads_out,
                      at::TensorList exp_avg, at::TensorList exp_avg_sq, int64_t step, double lr, double beta1,
                      double beta2, double adam_eps, double weight_decay, double max_norm, int64_t residual_every,
                      double eps, bool bf16) {
  TORCH_CHECK(params.size() == 8, "aunn_fast cpp: expected eight parameters");
  const bool adam = !exp_avg.empty();
  TORCH_CHECK(!adam || step >= 1, "aunn_fast cpp: Adam's step must be >= 1");
  TORCH_CHECK(adam || weight_decay == 0.0, "aunn_fast cpp: weight decay is only implemented for AdamW");
  const Model m = model_of(params[0], params[1], params[2], params[3], params[4], params[5], params[6],
                           params[7], residual_every, eps, bf16);
  const std::array<float*, 8> grad_ptrs = buffers_like(grads_out, params, "grads");
  std::array<float*, 8> m1{}, m2{};
  if (adam) {
    m1 = buffers_like(exp_avg, params, "exp_avg");
    m2 = buffers_like(exp_avg_sq, params, "exp_avg_sq");
  }
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
  const GradientParts& parts = run(m.params, m.shape, job);
  Update u{adam, static_cast<float>(lr), static_cast<float>(beta1), static_cast<float>(beta2),
           static_cast<float>(adam_eps), static_cast<float>(1.0 - lr * weight_decay), static_cast<float>(lr), 1.0f};
  if (adam) {
    u.step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, step)));
    u.inv_bias2_sqrt = static_cast<float>(1.0 / std::sqrt(1.0 - std::pow(beta2, step)));
  }
  float* param_ptrs[8];
  for (int i = 0; i < 8; ++i) param_ptrs[i] = params[i].data_ptr<float>();
  // The update of the rows a thread has summed, on that thread (a row's gradient is then in its cache).
  auto update_rows = [&](const ParamRows& param_rows, int64_t begin, int64_t end) {
    const FlushSubnormals flush;
    param_rows.for_each(begin, end, [&](int i, int64_t row, int64_t count) {
      const int64_t first = row * param_rows.cols[i], n = count * param_rows.cols[i];
      update_parameters(u, param_ptrs[i] + first, grad_ptrs[i] + first, adam ? m1[i] + first : nullptr,
                        adam ? m2[i] + first : nullptr, n);
    });
  };
  const ParamRows param_rows(m.shape);
  if (max_norm > 0.0) {  // the total norm needs every gradient before any update
    sum_gradients(m.shape, param_rows, parts, grad_ptrs.data(), [](const ParamRows&, int64_t, int64_t) {});
    clip_total_norm(grad_ptrs.data(), params, max_norm);
    for_param_rows(param_rows, parts, [&](int64_t begin, int64_t end) { update_rows(param_rows, begin, end); });
  } else {
    sum_gradients(m.shape, param_rows, parts, grad_ptrs.data(), update_rows);
  }
  for (const at::TensorList& mutated : {params, grads_out, exp_avg, exp_avg_sq})
    for (const Tensor& t : mutated) t.unsafeGetTensorImpl()->bump_version();  // as torch.optim's in-place updates
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

// The step is an optimizer's update, outside autograd as torch.optim's steps are: no autograd kernel to pass
// through (a prompt's step would pay for one in every call, grad mode on or off).
TORCH_LIBRARY_IMPL(aunn_fast, Autograd, m) { m.impl("cpp_train_step", torch::CppFunction::makeFallthrough()); }

}  // namespace aunn_cpu
