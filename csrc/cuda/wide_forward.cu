// The wide path's forward: one product per layer with its epilogue and the next layer's RMSNorm fused in, and the
// cross-entropy over the logits (wide.h has the interface, WIDE.md the design).
#include <cmath>
#include <cstdint>

#include "wide.h"
#include "wide_tiles.cuh"

namespace aunn_wide {
namespace {

const float* gain_of(const Model& m, int64_t layer) {
  return layer == 0 ? m.in_gain : m.hidden_gain + (layer - 1) * m.hidden;
}

// Layer p's output as the next product's operand; layer p >= 1 adds layer p - every's output when p % every == 0.
Normalized layer_output(const Model& m, const Activations& a, int64_t p) {
  const int64_t nh = a.rows * m.hidden, tiles = column_tiles(m.hidden);
  const bool residual = p >= 1 && p % m.residual_every == 0;
  Normalized op;
  op.s = a.s + p * nh;
  op.gain = gain_of(m, p);
  op.residual = residual ? a.y + (p - m.residual_every) * nh : nullptr;
  op.sumsq = a.sumsq + p * a.rows * tiles;
  op.tiles = tiles;
  op.hidden = m.hidden;
  op.eps = m.eps;
  op.y_out = a.y + p * nh;
  op.rstd_out = a.rstd != nullptr ? a.rstd + p * a.rows : nullptr;
  return op;
}

SiluStore layer_epilogue(const Model& m, const Activations& a, int64_t p, const float* bias) {
  const int64_t nh = a.rows * m.hidden, tiles = column_tiles(m.hidden);
  return SiluStore{bias, a.s + p * nh, a.z != nullptr ? a.z + p * nh : nullptr, a.sumsq + p * a.rows * tiles, tiles,
                   m.hidden};
}

// One warp per row: the loss from the row's max, the target's logit and the sum of exp(logit - max) over the other
// entries kept apart (a memorised row's loss is then log1p(others / e_target) with all its digits); with
// write_grad, dL/dlogits = weight * (softmax - onehot), the target's entry as -others / total.
__global__ void cross_entropy_kernel(float* logits, const int64_t* targets, int64_t rows, int64_t vocab,
                                     float* row_loss, bool write_grad, const float* row_weights, float weight) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // the same for the whole warp
  float* l = logits + row * vocab;
  float top = -INFINITY;
  for (int64_t v = lane; v < vocab; v += 32) top = fmaxf(top, l[v]);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, offset));
  const int64_t target = targets[row];
  const bool valid = target >= 0 && target < vocab;
  float others = 0.0f;
  for (int64_t v = lane; v < vocab; v += 32)
    if (v != target) others += expf(l[v] - top);
  others = warp_sum(others);
  const float shifted = valid ? l[target] - top : NAN;  // <= 0
  const float own = expf(shifted);
  const float total = own + others;
  const float loss = shifted > -20.0f ? log1pf(others / own) : logf(total) - shifted;
  if (lane == 0) row_loss[row] = loss;
  __syncwarp();
  if (!write_grad) return;
  const float w = row_weights != nullptr ? row_weights[row] : weight;
  for (int64_t v = lane; v < vocab; v += 32)
    l[v] = w * (v == target ? -others / total : expf(l[v] - top) / total);
}

}  // namespace

cudaError_t forward(const Model& m, const int64_t* idx, const Activations& a, cudaStream_t stream) {
  const int64_t n = a.rows, h = m.hidden;
  cudaError_t status = launch_product(BitsOfRows{idx}, Dense<float, true>{m.in_weight, m.bits},
                                      layer_epilogue(m, a, 0, m.in_bias), n, h, m.bits, stream);
  for (int64_t l = 1; l < m.layers && status == cudaSuccess; ++l) {
    status = launch_product(layer_output(m, a, l - 1), Dense<float, true>{m.hidden_weight + (l - 1) * h * h, h},
                            layer_epilogue(m, a, l, m.hidden_bias + (l - 1) * h), n, h, h, stream);
  }
  if (status != cudaSuccess) return status;
  return launch_product(layer_output(m, a, m.layers - 1), Dense<float, true>{m.out_weight, h},
                        BiasStore{m.out_bias, a.logits}, n, m.vocab, h, stream);
}

cudaError_t cross_entropy(const Activations& a, int64_t vocab, const int64_t* targets, float* row_loss,
                          bool write_grad, const float* row_weights, float weight, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(a.rows, kWarps)));
  cross_entropy_kernel<<<grid, kThreads, 0, stream>>>(a.logits, targets, a.rows, vocab, row_loss, write_grad,
                                                      row_weights, weight);
  return cudaGetLastError();
}

}  // namespace aunn_wide
