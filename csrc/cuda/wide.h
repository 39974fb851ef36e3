// The wide-model CUDA path (H = 256-1024): the host interface shared by the kernels (wide_*.cu) and the
// operators (wide_bindings.cpp). Plain pointers and sizes only; no torch headers, so every .cu compiles alone.
//
// A model of L layers has D = L - 1 layers with [N, H] outputs: layer 0 (the input layer, on the index bits) and
// the hidden layers 1..D-1 (hidden_weight[l - 1]); layer p >= 1 adds the output of layer p - residual_every when
// p % residual_every == 0. The head maps layer D-1's output to the vocabulary. See WIDE.md for the design.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace aunn_wide {

constexpr int kTileM = 64;  // rows of a product's output tile
constexpr int kTileN = 64;  // columns of a product's output tile (RMSNorm partials are per kTileN columns)
constexpr int kTileK = 32;  // depth of one shared-memory stage
constexpr int kWeightGradMinRows = 256;  // a weight-gradient split sums at least this many rows

// float32 parameters, contiguous, nn.Linear's [out, in] layout (AUNNParams).
struct Model {
  const float* in_weight;      // [H, B]
  const float* in_bias;        // [H]
  const float* in_gain;        // [H]
  const float* hidden_weight;  // [D-1, H, H]
  const float* hidden_bias;    // [D-1, H]
  const float* hidden_gain;    // [D-1, H]
  const float* out_weight;     // [V, H]
  const float* out_bias;       // [V]
  int64_t hidden, bits, vocab, layers, residual_every;  // layers = D (the input layer and the hidden layers)
  float eps;
};

// One call's activations, all float32 and written by the forward (N = rows, T = column_tiles(H)).
struct Activations {
  int64_t rows;
  float* s;       // [D, N, H] silu(z) of every layer
  float* y;       // [D, N, H] every layer's output (RMSNorm, gain, residual), written by the next product
  float* sumsq;   // [D, N, T] each output tile's sum of s^2 over its columns
  float* z;       // [D, N, H] pre-activations, or nullptr when no backward follows
  float* rstd;    // [D, N] each row's RMSNorm scale, or nullptr when no backward follows
  float* logits;  // [N, V]; the loss turns it into dL/dlogits in place
};

// The backward's scratch.
struct BackwardBuffers {
  float* dy;              // [D, N, H] dL/d(layer output)
  float* rowdot;          // [D, N, T] per output tile: sum over its columns of dy * gain * s
  __nv_bfloat16* dz;      // [N, H] dL/dz of the layer in progress (the weight gradient's operand)
  float* gain_partials;   // [ceil(N / kTileM), D, H] per row tile and layer: sum over its rows of dy * s * rstd
  float* workspace;       // weight_grad_workspace(...) floats: split weight-gradient partials
};

// Where the eight gradients go (float32, the parameters' shapes).
struct Gradients {
  float *in_weight, *in_bias, *in_gain, *hidden_weight, *hidden_bias, *hidden_gain, *out_weight, *out_bias;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t column_tiles(int64_t hidden) { return ceil_div(hidden, kTileN); }

// How a weight gradient (an [M, N] sum over `rows` rows) splits its rows: about two blocks per SM, at least
// kWeightGradMinRows rows per split, each split a multiple of kTileK rows.
struct Split {
  int64_t splits, chunk;
};
inline Split weight_grad_split(int64_t rows, int64_t m, int64_t n, int64_t sms) {
  const int64_t tiles = ceil_div(m, kTileM) * ceil_div(n, kTileN);
  int64_t splits = ceil_div(2 * sms, tiles);
  const int64_t most = ceil_div(rows, kWeightGradMinRows);
  splits = splits < most ? splits : most;
  splits = splits < 1 ? 1 : splits;
  const int64_t chunk = ceil_div(ceil_div(rows, splits), kTileK) * kTileK;
  return {ceil_div(rows, chunk), chunk};
}

// Floats of BackwardBuffers::workspace: the largest of the weight gradients' partials, [splits, M N + M] for the
// input layer's and the head's, and all hidden layers' at once ([splits, D-1, H, H] then [splits, D-1, H]).
inline int64_t weight_grad_workspace(const Model& m, int64_t rows, int64_t sms) {
  const int64_t shapes[3][3] = {{m.hidden, m.bits, 1}, {m.hidden, m.hidden, m.layers - 1}, {m.vocab, m.hidden, 1}};
  int64_t most = 0;
  for (const auto& s : shapes) {
    const int64_t size = weight_grad_split(rows, s[0], s[1], sms).splits * s[2] * (s[0] * s[1] + s[0]);
    most = size > most ? size : most;
  }
  return most;
}

// Every layer's activations and the logits of rows > 0 indices (int64 [N]).
cudaError_t forward(const Model& model, const int64_t* idx, const Activations& acts, cudaStream_t stream);

// Row losses [N] (cross-entropy of targets int64 [N]) from acts.logits; with write_grad also dL/dlogits in place,
// row r's scaled by row_weights[r] (when not null) or by weight. A target outside the vocabulary gives its row a
// NaN loss and NaN gradients: no check that would wait for the GPU.
cudaError_t cross_entropy(const Activations& acts, int64_t vocab, const int64_t* targets, float* row_loss,
                          bool write_grad, const float* row_weights, float weight, cudaStream_t stream);

// The eight gradients from dL/dlogits in acts.logits, after a forward that kept z and rstd.
cudaError_t backward(const Model& model, const int64_t* idx, const Activations& acts, const BackwardBuffers& buffers,
                     const Gradients& grads, int64_t sms, cudaStream_t stream);

}  // namespace aunn_wide
