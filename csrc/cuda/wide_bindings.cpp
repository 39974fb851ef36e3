// The wide-model CUDA path (wide_*.cu) as operators in the aunn_fast namespace (prefix cuda_wide_). Their fake
// implementations and autograd formulas are registered from Python (aunn_fast/cuda_wide.py).
//
// bf16 products with fp32 accumulation; parameters, activations and results float32. Every operator takes the
// eight parameters of AUNNParams, residual_every, eps, and `poison` (fill every buffer it allocates with NaN
// first, so a test sees any element a kernel failed to write). poison has no default on purpose: the dispatcher
// drops arguments equal to their default before autograd sees them, so the backward registered from Python would
// have to return one gradient fewer whenever it was left out.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "wide.h"

namespace aunn_wide {
namespace {

using at::Tensor;

// Rows per call of the forward-only operators (logits, argmax, a loss without gradients): their activations
// ([L-1, rows, H] float32, twice) stay bounded however many indices come.
constexpr int64_t kInferenceRows = 16384;
constexpr int64_t kMaxVocab = 65536;

void check_cuda(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, "aunn_fast cuda_wide: ", what, " failed: ", cudaGetErrorString(status));
}

void check_rows(const Tensor& t, const char* name, const Tensor& idx) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous(), "aunn_fast cuda_wide: ",
              name, " must be a contiguous int64 CUDA vector");
  TORCH_CHECK(t.device() == idx.device(), "aunn_fast cuda_wide: ", name, " is on ", t.device(), ", idx on ",
              idx.device());
  TORCH_CHECK(t.size(0) == idx.size(0), "aunn_fast cuda_wide: ", name, " has ", t.size(0), " rows, idx ", idx.size(0));
}

// The model's pointers and shape, after checking every parameter against idx's device and the others' shapes.
Model model_of(const Tensor& idx, const std::vector<Tensor>& p, int64_t residual_every, double eps) {
  TORCH_CHECK(idx.is_cuda() && idx.scalar_type() == at::kLong && idx.dim() == 1 && idx.is_contiguous(),
              "aunn_fast cuda_wide: idx must be a contiguous int64 CUDA vector");
  const char* names[] = {"in_weight", "in_bias", "in_gain", "hidden_weight", "hidden_bias", "hidden_gain",
                         "out_weight", "out_bias"};
  for (int i = 0; i < 8; ++i) {
    TORCH_CHECK(p[i].device() == idx.device() && p[i].scalar_type() == at::kFloat && p[i].is_contiguous(),
                "aunn_fast cuda_wide: ", names[i], " must be a contiguous float32 tensor on ", idx.device());
  }
  TORCH_CHECK(p[0].dim() == 2 && p[3].dim() == 3 && p[6].dim() == 2,
              "aunn_fast cuda_wide: weight ranks must be 2, 3, 2");
  const int64_t h = p[0].size(0), bits = p[0].size(1), hidden_layers = p[3].size(0), v = p[6].size(0);
  TORCH_CHECK(h >= 1 && bits >= 1 && bits <= 64 && v >= 1 && v <= kMaxVocab && residual_every >= 1,
              "aunn_fast cuda_wide: needs hidden >= 1, 1 <= bits <= 64, 1 <= vocab <= ", kMaxVocab,
              ", residual_every >= 1");
  TORCH_CHECK(p[1].numel() == h && p[2].numel() == h && p[3].size(1) == h && p[3].size(2) == h &&
                  p[4].numel() == hidden_layers * h && p[5].numel() == hidden_layers * h && p[6].size(1) == h &&
                  p[7].numel() == v,
              "aunn_fast cuda_wide: parameter shapes disagree");
  Model m{};
  m.in_weight = p[0].data_ptr<float>();
  m.in_bias = p[1].data_ptr<float>();
  m.in_gain = p[2].data_ptr<float>();
  m.hidden_weight = p[3].data_ptr<float>();
  m.hidden_bias = p[4].data_ptr<float>();
  m.hidden_gain = p[5].data_ptr<float>();
  m.out_weight = p[6].data_ptr<float>();
  m.out_bias = p[7].data_ptr<float>();
  m.hidden = h;
  m.bits = bits;
  m.vocab = v;
  m.layers = hidden_layers + 1;
  m.residual_every = residual_every;
  m.eps = static_cast<float>(eps);
  return m;
}

Tensor buffer(at::IntArrayRef shape, const Tensor& like, at::ScalarType dtype, bool poison) {
  const auto options = like.options().dtype(dtype);
  return poison ? at::full(shape, NAN, options) : at::empty(shape, options);
}

// One forward's buffers; `save` keeps what a backward needs (z, rstd).
struct Forward {
  std::vector<Tensor> keep;  // owns the memory acts points into
  Tensor logits;             // [N, V]
  Activations acts{};
};

Forward run_forward(const Model& m, const Tensor& idx, bool save, bool poison, cudaStream_t stream) {
  const int64_t n = idx.size(0), d = m.layers, h = m.hidden, tiles = column_tiles(h);
  Forward f;
  auto f32 = [&](at::IntArrayRef shape) {
    f.keep.push_back(buffer(shape, idx, at::kFloat, poison));
    return f.keep.back().data_ptr<float>();
  };
  f.acts.rows = n;
  f.acts.s = f32({d, n, h});
  f.acts.y = f32({d, n, h});
  f.acts.sumsq = f32({d, n, tiles});
  f.acts.z = save ? f32({d, n, h}) : nullptr;
  f.acts.rstd = save ? f32({d, n}) : nullptr;
  f.logits = buffer({n, m.vocab}, idx, at::kFloat, poison);
  f.acts.logits = f.logits.data_ptr<float>();
  if (n > 0) check_cuda(forward(m, idx.data_ptr<int64_t>(), f.acts, stream), "the forward");
  return f;
}

// The eight gradients from dL/dlogits at acts.logits (n > 0).
std::vector<Tensor> run_backward(const Model& m, const Tensor& idx, const Forward& f, const std::vector<Tensor>& like,
                                 bool poison, cudaStream_t stream) {
  const int64_t n = idx.size(0), d = m.layers, h = m.hidden, tiles = column_tiles(h);
  int sms = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, idx.device().index()), "reading the SMs");
  std::vector<Tensor> grads;
  for (const Tensor& p : like) grads.push_back(buffer(p.sizes(), p, at::kFloat, poison));
  const Tensor dy = buffer({d, n, h}, idx, at::kFloat, poison);
  const Tensor rowdot = buffer({d, n, tiles}, idx, at::kFloat, poison);
  const Tensor dz = buffer({n, h}, idx, at::kBFloat16, poison);
  const Tensor gain_partials = buffer({ceil_div(n, kTileM), d, h}, idx, at::kFloat, poison);
  const Tensor workspace = buffer({weight_grad_workspace(m, n, sms)}, idx, at::kFloat, poison);
  const BackwardBuffers b{dy.data_ptr<float>(), rowdot.data_ptr<float>(),
                          reinterpret_cast<__nv_bfloat16*>(dz.data_ptr<at::BFloat16>()),
                          gain_partials.data_ptr<float>(), workspace.data_ptr<float>()};
  const Gradients g{grads[0].data_ptr<float>(), grads[1].data_ptr<float>(), grads[2].data_ptr<float>(),
                    grads[3].data_ptr<float>(), grads[4].data_ptr<float>(), grads[5].data_ptr<float>(),
                    grads[6].data_ptr<float>(), grads[7].data_ptr<float>()};
  check_cuda(backward(m, idx.data_ptr<int64_t>(), f.acts, b, g, sms, stream), "the backward");
  return grads;
}

std::vector<Tensor> zero_grads(const std::vector<Tensor>& like) {
  std::vector<Tensor> out;
  for (const Tensor& p : like) out.push_back(at::zeros_like(p));
  return out;
}

// Runs `body(start, rows)` over consecutive slices of at most kInferenceRows rows.
template <class Body>
void in_slices(int64_t n, Body body) {
  for (int64_t start = 0; start < n; start += kInferenceRows) body(start, std::min(kInferenceRows, n - start));
}

#define AUNN_PARAMS_DECL                                                                                        \
  const Tensor &in_weight, const Tensor &in_bias, const Tensor &in_gain, const Tensor &hidden_weight,          \
      const Tensor &hidden_bias, const Tensor &hidden_gain, const Tensor &out_weight, const Tensor &out_bias,    \
      int64_t residual_every, double eps
#define AUNN_PARAM_LIST \
  std::vector<Tensor> { in_weight, in_bias, in_gain, hidden_weight, hidden_bias, hidden_gain, out_weight, out_bias }

Tensor cuda_wide_logits(const Tensor& idx, AUNN_PARAMS_DECL, bool poison) {
  const std::vector<Tensor> p = AUNN_PARAM_LIST;
  const Model m = model_of(idx, p, residual_every, eps);
  const c10::cuda::CUDAGuard guard(idx.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(idx.device().index());
  Tensor out = buffer({idx.size(0), m.vocab}, idx, at::kFloat, poison);
  in_slices(idx.size(0), [&](int64_t start, int64_t rows) {
    Forward f = run_forward(m, idx.narrow(0, start, rows), false, poison, stream);
    out.narrow(0, start, rows).copy_(f.logits);
  });
  return out;
}

Tensor cuda_wide_argmax(const Tensor& idx, AUNN_PARAMS_DECL, bool poison) {
  const std::vector<Tensor> p = AUNN_PARAM_LIST;
  const Model m = model_of(idx, p, residual_every, eps);
  const c10::cuda::CUDAGuard guard(idx.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(idx.device().index());
  Tensor out = poison ? at::full({idx.size(0)}, -1, idx.options()) : at::empty({idx.size(0)}, idx.options());
  in_slices(idx.size(0), [&](int64_t start, int64_t rows) {
    Forward f = run_forward(m, idx.narrow(0, start, rows), false, poison, stream);
    out.narrow(0, start, rows).copy_(at::argmax(f.logits, 1));
  });
  return out;
}

// reduction "mean" / "sum": (the loss, a scalar; with_grads: its eight gradients); "none": (row losses [N], []).
std::tuple<Tensor, std::vector<Tensor>> cuda_wide_loss(const Tensor& idx, const Tensor& targets, AUNN_PARAMS_DECL,
                                                       std::string reduction, bool with_grads, bool poison) {
  const std::vector<Tensor> p = AUNN_PARAM_LIST;
  const Model m = model_of(idx, p, residual_every, eps);
  check_rows(targets, "targets", idx);
  TORCH_CHECK(reduction == "mean" || reduction == "sum" || reduction == "none",
              "aunn_fast cuda_wide: reduction must be mean, sum or none, got ", reduction);
  TORCH_CHECK(!(with_grads && reduction == "none"),
              "aunn_fast cuda_wide: gradients of unreduced losses come from cuda_wide_loss_backward");
  const c10::cuda::CUDAGuard guard(idx.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(idx.device().index());
  const int64_t n = idx.size(0);
  Tensor rows = buffer({n}, idx, at::kFloat, poison);
  std::vector<Tensor> grads;
  if (with_grads && n > 0) {
    const Forward f = run_forward(m, idx, true, poison, stream);
    const float weight = reduction == "mean" ? 1.0f / static_cast<float>(n) : 1.0f;
    check_cuda(cross_entropy(f.acts, m.vocab, targets.data_ptr<int64_t>(), rows.data_ptr<float>(), true, nullptr,
                             weight, stream),
               "the loss");
    grads = run_backward(m, idx, f, p, poison, stream);
  } else {
    if (with_grads) grads = zero_grads(p);
    in_slices(n, [&](int64_t start, int64_t count) {
      const Forward f = run_forward(m, idx.narrow(0, start, count), false, poison, stream);
      check_cuda(cross_entropy(f.acts, m.vocab, targets.data_ptr<int64_t>() + start, rows.data_ptr<float>() + start,
                               false, nullptr, 0.0f, stream),
                 "the loss");
    });
  }
  if (reduction == "none") return {rows, grads};
  if (reduction == "sum" || n == 0) return {rows.sum(), grads};  // the mean of no rows is 0, with zero gradients
  return {rows.mean(), grads};
}

// The eight gradients of sum over rows of grad[r] * loss[r].
std::vector<Tensor> cuda_wide_loss_backward(const Tensor& grad, const Tensor& idx, const Tensor& targets,
                                            AUNN_PARAMS_DECL, bool poison) {
  const std::vector<Tensor> p = AUNN_PARAM_LIST;
  const Model m = model_of(idx, p, residual_every, eps);
  check_rows(targets, "targets", idx);
  const int64_t n = idx.size(0);
  TORCH_CHECK(grad.numel() == n && grad.device() == idx.device(), "aunn_fast cuda_wide: the loss gradient has ",
              grad.numel(), " elements on ", grad.device(), ", expected ", n, " on ", idx.device());
  if (n == 0) return zero_grads(p);
  const c10::cuda::CUDAGuard guard(idx.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(idx.device().index());
  const Tensor weights = grad.to(at::kFloat).contiguous().view({n});
  const Tensor rows = buffer({n}, idx, at::kFloat, poison);
  const Forward f = run_forward(m, idx, true, poison, stream);
  check_cuda(cross_entropy(f.acts, m.vocab, targets.data_ptr<int64_t>(), rows.data_ptr<float>(), true,
                           weights.data_ptr<float>(), 0.0f, stream),
             "the loss");
  return run_backward(m, idx, f, p, poison, stream);
}

// The eight gradients of sum(grad * logits).
std::vector<Tensor> cuda_wide_logits_backward(const Tensor& grad, const Tensor& idx, AUNN_PARAMS_DECL, bool poison) {
  const std::vector<Tensor> p = AUNN_PARAM_LIST;
  const Model m = model_of(idx, p, residual_every, eps);
  const int64_t n = idx.size(0);
  TORCH_CHECK(grad.numel() == n * m.vocab && grad.device() == idx.device(),
              "aunn_fast cuda_wide: the logits gradient must be [", n, ", ", m.vocab, "] on ", idx.device());
  if (n == 0) return zero_grads(p);
  const c10::cuda::CUDAGuard guard(idx.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(idx.device().index());
  const Tensor dlogits = grad.to(at::kFloat).contiguous();
  Forward f = run_forward(m, idx, true, poison, stream);
  f.acts.logits = dlogits.data_ptr<float>();  // the backward only reads it
  return run_backward(m, idx, f, p, poison, stream);
}

}  // namespace

#define AUNN_PARAMS_SCHEMA                                                                          \
  "Tensor in_weight, Tensor in_bias, Tensor in_gain, Tensor hidden_weight, Tensor hidden_bias, "   \
  "Tensor hidden_gain, Tensor out_weight, Tensor out_bias, int residual_every, float eps"

TORCH_LIBRARY_FRAGMENT(aunn_fast, m) {
  m.def("cuda_wide_logits(Tensor idx, " AUNN_PARAMS_SCHEMA ", bool poison) -> Tensor");
  m.def("cuda_wide_argmax(Tensor idx, " AUNN_PARAMS_SCHEMA ", bool poison) -> Tensor");
  m.def("cuda_wide_loss(Tensor idx, Tensor targets, " AUNN_PARAMS_SCHEMA
        ", str reduction, bool with_grads, bool poison) -> (Tensor, Tensor[])");
  m.def("cuda_wide_loss_backward(Tensor grad, Tensor idx, Tensor targets, " AUNN_PARAMS_SCHEMA
        ", bool poison) -> Tensor[]");
  m.def("cuda_wide_logits_backward(Tensor grad, Tensor idx, " AUNN_PARAMS_SCHEMA ", bool poison) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(aunn_fast, CUDA, m) {
  m.impl("cuda_wide_logits", &cuda_wide_logits);
  m.impl("cuda_wide_argmax", &cuda_wide_argmax);
  m.impl("cuda_wide_loss", &cuda_wide_loss);
  m.impl("cuda_wide_loss_backward", &cuda_wide_loss_backward);
  m.impl("cuda_wide_logits_backward", &cuda_wide_logits_backward);
}

}  // namespace aunn_wide
