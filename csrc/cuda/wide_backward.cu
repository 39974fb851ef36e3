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
  if (count == 0) return cudaSuccess;
  const int64_t blocks = ceil_div(count, threads) < 4096 ? ceil_div(count, threads) : 4096;
  sum_slices_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(in, slice, slices, count, out);
  return cudaGetLastError();
}

const float* gain_of(const Model& m, int64_t layer) {
  return layer == 0 ? m.in_gain : m.hidden_gain + (layer - 1) * m.hidden;
}

// The layer whose residual adds layer p's output (p + every, when p % every == 0 and that layer exists), or -1.
int64_t residual_consumer(const Model& m, int64_t p) {
  return p % m.residual_every == 0 && p + m.residual_every < m.layers ? p + m.residual_every : -1;
}

// Epilogue of the product that makes dL/dy of layer p; its gain partials go to b.gain_partials [row tiles, D, H].
GradStore layer_grad(const Model& m, const Activations& a, const BackwardBuffers& b, int64_t p) {
  const int64_t nh = a.rows * m.hidden, tiles = column_tiles(m.hidden);
  const int64_t consumer = residual_consumer(m, p);
  return GradStore{consumer >= 0 ? b.dy + consumer * nh : nullptr,
                   b.dy + p * nh,
                   gain_of(m, p),
                   a.s + p * nh,
                   a.rstd + p * a.rows,
                   b.rowdot + p * a.rows * tiles,
                   b.gain_partials + p * m.hidden,
                   m.layers * m.hidden,
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

// Where a weight gradient's split partials go: the weights' [M, N] of split z at weights + z * weight_slice, the
// bias's [M] (A's row sums) at biases + z * bias_slice.
struct Partials {
  float* weights;
  int64_t weight_slice;
  float* biases;
  int64_t bias_slice;
};

// The split partials of dW [M, N] = sum over rows of A^T B (A an i-contiguous [rows, M] operand) and of db [M]
// (A's column sums).
template <class A, class B>
cudaError_t weight_grad_partials(const A& a_op, const B& b_op, int64_t m, int64_t n, Split split,
                                 const Partials& out, int64_t rows, cudaStream_t stream) {
  return launch_product<A, B, PartialStore, true>(a_op, b_op, PartialStore{out.weights, out.weight_slice}, m, n,
                                                  rows, split, out.biases, out.bias_slice, stream);
}

// dW and db of one layer: its partials in the workspace, then their sums.
template <class A, class B>
cudaError_t weight_grad(const A& a_op, const B& b_op, int64_t m, int64_t n, int64_t rows, int64_t sms,
                        float* workspace, float* dw, float* db, cudaStream_t stream) {
  const Split split = weight_grad_split(rows, m, n, sms);
  const int64_t slice = m * n + m;
  const Partials out{workspace, slice, workspace + m * n, slice};
  cudaError_t status = weight_grad_partials(a_op, b_op, m, n, split, out, rows, stream);
  if (status == cudaSuccess) status = sum_slices(workspace, slice, split.splits, m * n, dw, stream);
  if (status == cudaSuccess) status = sum_slices(workspace + m * n, slice, split.splits, m, db, stream);
  return status;
}

}  // namespace

cudaError_t backward(const Model& m, const int64_t* idx, const Activations& a, const BackwardBuffers& b,
                     const Gradients& g, int64_t sms, cudaStream_t stream) {
  const int64_t n = a.rows, h = m.hidden, top = m.layers - 1, hidden_layers = m.layers - 1;
  // the head: dy of the top layer = dlogits @ W_out, and W_out's and b_out's gradients
  cudaError_t status = launch_product(Dense<float, true>{a.logits, m.vocab}, Dense<float, false>{m.out_weight, h},
                                      layer_grad(m, a, b, top), n, h, m.vocab, stream);
  if (status == cudaSuccess)
    status = weight_grad(Dense<float, false>{a.logits, m.vocab}, Dense<float, false>{a.y + top * n * h, h}, m.vocab,
                         h, n, sms, b.workspace, g.out_weight, g.out_bias, stream);
  // hidden layers from the top: dy of layer l - 1 = dz_l @ W_l (dz_l stored on the way), then W_l's gradient
  // partials, every hidden layer's in one workspace ([splits, D-1, H, H], then [splits, D-1, H]) summed once
  const Split split = weight_grad_split(n, h, h, sms);
  float* const hidden_biases = b.workspace + split.splits * hidden_layers * h * h;
  for (int64_t l = top; l >= 1 && status == cudaSuccess; --l) {
    status = launch_product(layer_dz(m, a, b, l), Dense<float, false>{m.hidden_weight + (l - 1) * h * h, h},
                            layer_grad(m, a, b, l - 1), n, h, h, stream);
    const Partials out{b.workspace + (l - 1) * h * h, hidden_layers * h * h, hidden_biases + (l - 1) * h,
                       hidden_layers * h};
    if (status == cudaSuccess)
      status = weight_grad_partials(Dense<__nv_bfloat16, false>{b.dz, h}, Dense<float, false>{a.y + (l - 1) * n * h, h},
                                    h, h, split, out, n, stream);
  }
  if (status == cudaSuccess)
    status = sum_slices(b.workspace, hidden_layers * h * h, split.splits, hidden_layers * h * h, g.hidden_weight,
                        stream);
  if (status == cudaSuccess)
    status = sum_slices(hidden_biases, hidden_layers * h, split.splits, hidden_layers * h, g.hidden_bias, stream);
  // the input layer: its dz has no product of its own to ride on
  if (status == cudaSuccess) {
    materialize_kernel<<<static_cast<unsigned>(ceil_div(n, kTileM)), kThreads, 0, stream>>>(layer_dz(m, a, b, 0), n,
                                                                                           h);
    status = cudaGetLastError();
  }
  if (status == cudaSuccess)
    status = weight_grad(Dense<__nv_bfloat16, false>{b.dz, h}, BitsOfColumns{idx}, h, m.bits, n, sms, b.workspace,
                         g.in_weight, g.in_bias, stream);
  // every layer's gain from the partials [row tiles, D, H]: the input layer's, then the hidden layers' at once
  const int64_t row_tiles = ceil_div(n, kTileM), stride = m.layers * h;
  if (status == cudaSuccess) status = sum_slices(b.gain_partials, stride, row_tiles, h, g.in_gain, stream);
  if (status == cudaSuccess)
    status = sum_slices(b.gain_partials + h, stride, row_tiles, (m.layers - 1) * h, g.hidden_gain, stream);
  return status;
}

}  // namespace aunn_wide
