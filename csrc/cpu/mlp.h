// The fused CPU AUNN: forward, loss, argmax and backward over blocks of rows kept in cache through all layers.
//
// Float32 activations, gradients and sums; the products' operands in float32 or, in bf16 (Shape::bf16), rounded
// to bfloat16 (bf16.h). Every dimension is padded to a multiple of the vector width (padding holds zeros in
// weights, biases and gains, so padded activations are exactly zero); each thread packs the weights once per call.
#pragma once

#include <algorithm>
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

// The eight parameters as rows of their own row-major layout, numbered one after another: in_weight as one row
// of H * B (its gradient is summed transposed), in_bias [1][H], in_gain [1][H], hidden_weight [(L-2) * H][H],
// hidden_bias [L-2][H], hidden_gain [L-2][H], out_weight [V][H], out_bias [1][V]. The unit in which threads share
// the gradients' sum and an optimizer's update.
struct ParamRows {
  int64_t rows[8], cols[8], total;
  explicit ParamRows(const Shape& s);
  // f(param, first_row, row_count) for the rows of each parameter within [begin, end), in order.
  template <class F>
  void for_each(int64_t begin, int64_t end, F&& f) const {
    int64_t first = 0;
    for (int i = 0; i < 8 && first < end; first += rows[i], ++i) {
      const int64_t from = std::max(begin, first), to = std::min(end, first + rows[i]);
      if (from < to) f(i, from - first, to - from);
    }
  }
};

// The gradient sums of one run's backward, one buffer per share of the blocks, in the shares' order (padded
// layout, mlp.cpp).
using GradientParts = std::vector<const float*>;

// Runs the job over blocks of rows on torch's intra-op threads, which claim the blocks a chunk at a time, each
// thread with its own pack of p's weights (packing on every core costs less than one pack that the other cores
// then read); returns the gradient sums of the threads' shares of the blocks, empty without a backward: the
// caller's buffers, valid until the calling thread's next run. The results do not depend on which thread ran
// which chunk.
const GradientParts& run(const Params& p, const Shape& s, const Job& job);

// Rows [begin, end) (ParamRows) of the gradients summed over parts, unpadded, into the eight parameter-shaped
// buffers out (order of Params); no parts: zeros.
void sum_gradient_rows(const Shape& s, const GradientParts& parts, int64_t begin, int64_t end, float* const out[8]);

}  // namespace aunn_cpu
