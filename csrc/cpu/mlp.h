// The fused CPU AUNN: forward, loss, argmax and backward over blocks of rows kept in cache through all layers.
//
// Float32 throughout. Every dimension is padded to a multiple of the vector width (padding holds zeros in
// weights, biases and gains, so padded activations are exactly zero); weights are packed once per call.
#pragma once

#include <cstdint>
#include <vector>

namespace aunn_cpu {

enum class Mode : int64_t { kLogits = 0, kLoss = 1, kArgmax = 2 };

// Unpadded float32 parameters as the Python side holds them (contiguous, nn.Linear's [out, in] layout).
struct Params {
  const float* in_weight;      // [H, B]
  const float* in_bias;        // [H]
  const float* in_gain;        // [H]
  const float* hidden_weight;  // [L-2, H, H]
  const float* hidden_bias;    // [L-2, H]
  const float* hidden_gain;    // [L-2, H]
  const float* out_weight;     // [V, H]
  const float* out_bias;       // [V]
};

struct Shape {
  int64_t hidden, vocab, bits, hidden_layers, residual_every;
  float eps;
};

// The weights padded and laid out for the products: forward operands transposed ([in][out]), backward
// operands as stored ([out][in]).
struct Packed {
  Shape shape;
  int64_t hp, vp;                 // hidden and vocab padded to the vector width
  std::vector<float> in_wt;       // [B][Hp]
  std::vector<float> in_b, in_g;  // [Hp]
  std::vector<float> wt, w;       // [L-2][Hp][Hp]: transposed, and as stored (w only for a backward)
  std::vector<float> hb, hg;      // [L-2][Hp]
  std::vector<float> out_wt;      // [Hp][Vp]
  std::vector<float> out_w;       // [Vp][Hp] (only for a backward)
  std::vector<float> ob;          // [Vp]
  Packed(const Params& p, const Shape& s, bool for_backward);
};

// The gradients in the packed layout: in_weight transposed, everything padded.
struct GradLayout {
  int64_t in_wt, in_b, in_g, w, hb, hg, out_w, ob, size;  // offsets into one buffer, and its size
  explicit GradLayout(const Packed& p);
};

// What one call computes over rows [0, n).
struct Job {
  const int64_t* idx;       // [n]
  const int64_t* targets;   // [n] (loss, or a loss backward)
  int64_t n;
  Mode mode;
  bool backward;            // accumulate parameter gradients
  const float* grad;        // upstream gradient: per row (loss; element i at grad[i * grad_stride]) or [n, V]
  int64_t grad_stride;
  float* out_float;         // logits [n, V] or row losses [n], or nullptr
  int64_t* out_index;       // argmax [n], or nullptr
};

// Runs the job over blocks of rows on torch's intra-op threads; returns the gradients summed over threads
// (GradLayout), or an empty vector without a backward.
std::vector<float> run(const Packed& packed, const Job& job);

// Writes the packed gradients into the eight unpadded parameter-shaped buffers (order of Params).
void unpack_gradients(const Packed& packed, const std::vector<float>& grads, float* const out[8]);

}  // namespace aunn_cpu
