// The fused AUNN step of csrc/cuda/fused_step.cu: its problem description and host entry points (no torch).
// Shapes: N rows, hidden width H in {16, 32, 64, 128}, `hidden_layers` = layers - 2, vocab V in 1..256.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace aunn_cuda {

// What one launch computes. Forward modes store one output per row; the backward modes also accumulate every
// parameter's gradient into `partials` (one row of grad_floats(...) floats per CTA, zeroed by the caller).
enum class StepMode : int {
  kLogits = 0,       // logits_out [N, V] float32
  kArgmax = 1,       // argmax_out [N] int64 (first maximum on ties)
  kLoss = 2,         // row_loss [N] float32 (cross-entropy of targets)
  kLossGrad = 3,     // row_loss, and the gradients of sum_r row_weight[r] * loss_r
  kLogitsGrad = 4,   // the gradients of sum_{r,v} dlogits_in[r, v] * logit_{r,v}
};

struct StepProblem {
  int64_t n = 0;            // rows
  int hidden = 0;           // H
  int hidden_layers = 0;    // layers - 2
  int bits = 0;             // 1..64
  int vocab = 0;            // 1..256
  int residual_every = 1;   // >= 1
  float eps = 0.0f;         // RMSNorm's eps
};

struct StepArgs {
  const int64_t* idx = nullptr;          // [N]
  const int64_t* targets = nullptr;      // [N] (loss modes)
  const float* row_weight = nullptr;     // kLossGrad: upstream gradient of each row's loss
  int64_t row_weight_stride = 0;         // 0 (one value for every row) or 1
  const float* dlogits_in = nullptr;     // kLogitsGrad: [N, V] float32, contiguous
  const __nv_bfloat16* weights = nullptr;  // packed bf16 weights, see packed_weight_elements
  const float* in_bias = nullptr;        // [H]
  const float* in_gain = nullptr;        // [H]
  const float* hidden_bias = nullptr;    // [hidden_layers, H]
  const float* hidden_gain = nullptr;    // [hidden_layers, H]
  const float* out_bias = nullptr;       // [V]
  float* row_loss = nullptr;             // [N] (kLoss, kLossGrad)
  float* logits_out = nullptr;           // [N, V] (kLogits)
  int64_t* argmax_out = nullptr;         // [N] (kArgmax)
  float* partials = nullptr;             // [grid, grad_floats] zeroed (backward modes)
};

// How a launch is laid out on the device: chosen by plan_step, used by launch_step.
struct StepPlan {
  int warps = 0;         // warps per CTA; a CTA owns 16 rows per warp at a time
  int grid = 0;          // persistent CTAs (= rows of `partials`); 0 when N == 0
  size_t smem = 0;       // dynamic shared memory per CTA, bytes
};

// The vocabulary padded to the mma tile (a multiple of 16).
__host__ __device__ inline int padded_vocab(int vocab) { return (vocab + 15) / 16 * 16; }

// Elements of the packed bf16 weight buffer, in this order: in_weight [H, 64] (bit columns >= bits zero),
// hidden_weight [hidden_layers, H, H], out_weight [padded_vocab, H] (rows >= V zero); all row-major [out, in].
inline int64_t packed_weight_elements(const StepProblem& p) {
  return static_cast<int64_t>(p.hidden) * 64 + static_cast<int64_t>(p.hidden_layers) * p.hidden * p.hidden +
         static_cast<int64_t>(padded_vocab(p.vocab)) * p.hidden;
}

// Floats of one gradient row, the eight parameters' gradients one after another in AUNNParams' order:
// in_weight [H, bits], in_bias [H], in_gain [H], hidden_weight, hidden_bias, hidden_gain, out_weight [V, H],
// out_bias [V].
__host__ __device__ inline int64_t grad_floats(const StepProblem& p) {
  const int64_t h = p.hidden, l = p.hidden_layers;
  return h * p.bits + 2 * h + l * h * h + 2 * l * h + static_cast<int64_t>(p.vocab) * h + p.vocab;
}

// Whether the fused step supports this width and vocabulary (H in {16, 32, 64, 128}, V <= 256).
bool step_supported(int hidden, int vocab);

// Chooses warps, grid and shared memory for `mode` on `device`; an error string (nullptr when planned): the
// problem does not fit a CTA's shared memory, or a CUDA query failed.
const char* plan_step(const StepProblem& p, StepMode mode, int device, StepPlan* plan);

// Launches the kernel of `mode` as planned on `stream`; returns the launch's error code.
cudaError_t launch_step(const StepProblem& p, StepMode mode, const StepPlan& plan, const StepArgs& args,
                        cudaStream_t stream);

}  // namespace aunn_cuda
