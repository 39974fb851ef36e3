// The wide path's backward from dL/dlogits: per layer from the top, one product dy_prev = dz @ W whose operand
// computes dz (the SiLU/RMSNorm backward, from the RMSNorm partials the previous product's epilogue left) and
// whose epilogue leaves the next layer's partials; then the weight gradient dz^T @ y_prev over the stored
// activations, its rows split for parallelism and the splits summed once (wide.h, WIDE.md).
#include <cstdint>

#include "wide.h"
#include "wide_tiles.cuh"

namespace aunn_wide {
namespace {

// out[e] = sum over s < slices of in[s * slice + e], e < count.
__global__ void sum_slices_kernel(const float* in, int64_t slice, int64_t slices, int64_t count, float* out) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < count;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float sum = 0.0f;
    for (int64_t s = 0; s < slices; ++s) sum += in[s * slice + e];
    out[e] = sum;
  }
}

cudaError_t sum_slices(const float* in, int64_t slice, int64_t slices, int64_t count, float* out,
                       cudaStream_t stream) {
  constexpr int threads = 256;
  const int64_t blocks = ceil_div(count, threads) < 4096 ? ceil_div(count, threads) : 4096;
  sum_slices_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(in, slice, slices, count, out);
  return cudaGetLastError();
}

const float* gain_of(const Model& m, int64_t layer) {
  return layer == 0 ? m.in_gain : m.hidden_gain + (layer - 1) * m.hidden;
}

float* gain_grad_of(const Model& m, const Gradients& g, int64_t layer) {
  return layer == 0 ? g.in_gain : g.hidden_gain + (layer - 1) * m.hidden;
}

// The layer whose residual adds layer p's output (p + every, when p % every == 0 and that layer exists), or -1.
int64_t residual_consumer(const Model& m, int64_t p) {
  return p % m.residual_every == 0 && p + m.residual_every < m.layers ? p + m.residual_every : -1;
}

// Epilogue of the product that makes dL/dy of layer p.
GradStore layer_grad(const Model& m, const Activations& a, const BackwardBuffers& b, int64_t p) {
  const int64_t nh = a.rows * m.hidden, tiles = column_tiles(m.hidden);
  const int64_t consumer = residual_consumer(m, p);
  return GradStore{consumer >= 0 ? b.dy + consumer * nh : nullptr,
                   b.dy + p * nh,
                   gain_of(m, p),
                   a.s + p * nh,
                   a.rstd + p * a.rows,
                   b.rowdot + p * a.rows * tiles,
                   b.gain_partials,
                   tiles,
                   m.hidden};
}

// dL/dz of layer p as an operand; stores it (bf16) into b.dz.
SiluNormGrad layer_dz(const Model& m, const Activations& a, const BackwardBuffers& b, int64_t p) {
  const int64_t nh = a.rows * m.hidden, tiles = column_tiles(m.hidden);
  SiluNormGrad op;
  op.dy = b.dy + p * nh;
  op.z = a.z + p * nh;
  op.s = a.s + p * nh;
  op.gain = gain_of(m, p);
  op.rstd = a.rstd + p * a.rows;
  op.rowdot = b.rowdot + p * a.rows * tiles;
  op.tiles = tiles;
  op.hidden = m.hidden;
  op.dz_out = b.dz;
  return op;
}

// dL/dgain of layer p from the gain partials its GradStore left.
cudaError_t gain_grad(const Model& m, const Activations& a, const BackwardBuffers& b, const Gradients& g, int64_t p,
                      cudaStream_t stream) {
  return sum_slices(b.gain_partials, m.hidden, ceil_div(a.rows, kTileM), m.hidden, gain_grad_of(m, g, p), stream);
}

// dW [M, N] = sum over rows of A^T B (A an i-contiguous [rows, M] operand), and db [M] = A's column sums.
template <class A, class B>
cudaError_t weight_grad(const A& a_op, const B& b_op, int64_t m, int64_t n, int64_t rows, int64_t sms,
                        float* workspace, float* dw, float* db, cudaStream_t stream) {
  const Split split = weight_grad_split(rows, m, n, sms);
  const int64_t slice = m * n + m;
  cudaError_t status = launch_product<A, B, PartialStore, true>(a_op, b_op, PartialStore{workspace, slice}, m, n, rows,
                                                                split, workspace + m * n, slice, stream);
  if (status == cudaSuccess) status = sum_slices(workspace, slice, split.splits, m * n, dw, stream);
  if (status == cudaSuccess) status = sum_slices(workspace + m * n, slice, split.splits, m, db, stream);
  return status;
}

}  // namespace

cudaError_t backward(const Model& m, const int64_t* idx, const Activations& a, const BackwardBuffers& b,
                     const Gradients& g, int64_t sms, cudaStream_t stream) {
  const int64_t n = a.rows, h = m.hidden, top = m.layers - 1;
  // the head: dy of the top layer = dlogits @ W_out, and W_out's and b_out's gradients
  cudaError_t status = launch_product(Dense<float, true>{a.logits, m.vocab}, Dense<float, false>{m.out_weight, h},
                                      layer_grad(m, a, b, top), n, h, m.vocab, stream);
  if (status == cudaSuccess) status = gain_grad(m, a, b, g, top, stream);
  if (status == cudaSuccess)
    status = weight_grad(Dense<float, false>{a.logits, m.vocab}, Dense<float, false>{a.y + top * n * h, h}, m.vocab,
                         h, n, sms, b.workspace, g.out_weight, g.out_bias, stream);
  // hidden layers from the top: dy of layer l - 1 = dz_l @ W_l (dz_l stored on the way), then W_l's gradient
  for (int64_t l = top; l >= 1 && status == cudaSuccess; --l) {
    status = launch_product(layer_dz(m, a, b, l), Dense<float, false>{m.hidden_weight + (l - 1) * h * h, h},
                            layer_grad(m, a, b, l - 1), n, h, h, stream);
    if (status == cudaSuccess) status = gain_grad(m, a, b, g, l - 1, stream);
    if (status == cudaSuccess)
      status = weight_grad(Dense<__nv_bfloat16, false>{b.dz, h}, Dense<float, false>{a.y + (l - 1) * n * h, h}, h, h,
                           n, sms, b.workspace, g.hidden_weight + (l - 1) * h * h, g.hidden_bias + (l - 1) * h,
                           stream);
  }
  // the input layer: its dz has no product to ride on
  if (status == cudaSuccess) {
    materialize_kernel<<<static_cast<unsigned>(ceil_div(n, kTileM)), kThreads, 0, stream>>>(layer_dz(m, a, b, 0), n,
                                                                                           h);
    status = cudaGetLastError();
  }
  if (status == cudaSuccess)
    status = weight_grad(Dense<__nv_bfloat16, false>{b.dz, h}, BitsOfColumns{idx}, h, m.bits, n, sms, b.workspace,
                         g.in_weight, g.in_bias, stream);
  return status;
}

}  // namespace aunn_wide
