// The fused CPU AUNN: forward, loss, argmax and backward over blocks of rows kept in cache through all layers.
//
// Float32 activations, gradients and sums; the products' operands in float32 or, in bf16 (Shape::bf16), rounded
// to bfloat16 (bf16.h). Every dimension is padded to a multiple of the vector width (padding holds zeros in
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
  bool bf16;  // the products' operands rounded to bfloat16, float32 sums (needs AUNN_HAS_BF16, tile.h)
};

typedef uint32_t Bf16Pair;  // two bfloat16 values along a product's k (tile.h)

// The weights padded and laid out for the products. float32: forward operands transposed ([in][out]),
// backward operands as stored ([out][in]). bf16: the same products' operands rounded, in pairs along k.
struct Packed {
  Shape shape{};
  int64_t hp = 0, vp = 0;         // hidden and vocab padded to the vector width
  std::vector<float> in_wt;       // [B][Hp] (rounded in bf16: the input layer sums weight rows exactly)
  std::vector<float> in_b, in_g;  // [Hp]
  std::vector<float> hb, hg;      // [L-2][Hp]
  std::vector<float> ob;          // [Vp]
  // float32
  std::vector<float> wt;          // [L-2][Hp][Hp], transposed
  std::vector<float> out_wt;      // [Hp][Vp]
  // The weights as stored, rows Hp floats apart: the parameters themselves where H == Hp, else padded copies.
  const float* w = nullptr;       // [L-2] layers Hp * Hp floats apart, H rows of Hp (null without a backward)
  const float* out_w = nullptr;   // [V][Hp] (the backward's operand, and a small vocabulary's head)
  std::vector<float> w_copy, out_w_copy;
  // bf16 (pack_pairs, bf16.h): forward operands [L-2][Hp/2][Hp] and [Hp/2][Vp], backward ones (only for a
  // backward) [L-2][Hp/2][Hp] and [Vp/2][Hp]
  std::vector<Bf16Pair> wt16, out_wt16, w16, out_w16;
  Packed() = default;
  Packed(const Params& p, const Shape& s, bool for_backward);
  // Packs p, reusing this pack's buffers (a prompt's step packs every call: the parameters change every step).
  void pack(const Params& p, const Shape& s, bool for_backward);
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
// (GradLayout), or an empty vector without a backward: a buffer of the calling thread, valid until its next run.
const std::vector<float>& run(const Packed& packed, const Job& job);

// Writes the packed gradients into the eight unpadded parameter-shaped buffers (order of Params).
void unpack_gradients(const Packed& packed, const std::vector<float>& grads, float* const out[8]);

}  // namespace aunn_cpu
