// The tiled product of the wide path and the pieces fused into it (device code, included by wide_*.cu).
//
// C[M, N] = A[M, K] @ B[N, K]^T on bf16 tensor cores (wmma 16x16x16, fp32 accumulators), one block of 8 warps per
// kTileM x kTileN output tile, each warp a 32 x 16 eighth. A and B are "operands": functors that give the float32
// value of element (i, k) and may compute it (the index bits, RMSNorm with gain and residual, the SiLU/RMSNorm
// backward); the block rounds each value to bf16 (nearest even) into shared memory, so every product sees
// bf16-rounded operands as the reference's bf16 mode does. The tile's accumulators then go through shared memory
// to an "epilogue" functor (bias, SiLU and the RMSNorm row partials; dy with its RMSNorm partials; plain stores).
//
// Global -> register loads of the next k-stage are issued before the current stage's products (one stage of
// register prefetch). Every bound is checked where a tile is loaded (i < rows, k < k_end): operands may assume
// their (i, k) is in range. Row offsets are int64 (N x H passes 2^31).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <mma.h>

#include "wide.h"

namespace aunn_wide {

constexpr int kThreads = 256;                             // 8 warps per block
constexpr int kWarps = kThreads / 32;
constexpr int kLds = kTileK + 8;                          // bf16 row stride of a shared operand tile (wmma: % 8)
constexpr int kLdc = kTileN + 4;                          // float row stride of the accumulator tile (wmma: % 4)
constexpr int kLoadsPerThread = kTileM * kTileK / kThreads;  // elements of one operand tile per thread
constexpr int kRowsPerWarp = kTileM / kWarps;             // epilogue: warp w owns rows w * 8 .. w * 8 + 7
static_assert(kTileM == kTileN, "A and B tiles share one load mapping");
constexpr int kWarpTileM = 32, kWarpTileN = 16;         // warps as 2 x 4 over the output tile
static_assert(kTileM == 64 && kTileN == 64 && kTileK == 32 && kThreads == 256, "the warp layout assumes these");
static_assert(kThreads % kTileM == 0, "row sums: thread t stays on row t % kTileM of an i-contiguous A");

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float sigmoid(float z) { return 1.0f / (1.0f + __expf(-z)); }

// Explicit conversions: torch's nvcc flags define __CUDA_NO_BFLOAT16_CONVERSIONS__.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// ----------------------------------------------------------------------------------------------- operands
// An operand has kKContiguous (whether consecutive k are adjacent in memory: the load mapping keeps a warp's
// lanes along the contiguous dimension), prepare(rows, i0, i_end) (A only: per-row values of the block's rows
// into shared `rows` [2 * kTileM], before a barrier) and load(i, k).

// A dense matrix in memory, element (i, k) at p[i * ld + k] (kKContiguous) or p[k * ld + i].
template <class T, bool kKContig>
struct Dense {
  static constexpr bool kKContiguous = kKContig;
  const T* p;
  int64_t ld;
  __device__ void prepare(float*, int64_t, int64_t) {}
  __device__ float load(int64_t i, int64_t k) const {
    return to_float(kKContig ? p[i * ld + k] : p[k * ld + i]);
  }
};

// The input layer's operand: element (row r, bit j) = (idx[r] >> j) & 1.
struct BitsOfRows {
  static constexpr bool kKContiguous = true;
  const int64_t* idx;
  __device__ void prepare(float*, int64_t, int64_t) {}
  __device__ float load(int64_t r, int64_t j) const { return static_cast<float>((idx[r] >> j) & 1); }
};

// The input weight gradient's operand B: element (bit j, row r) = (idx[r] >> j) & 1.
struct BitsOfColumns {
  static constexpr bool kKContiguous = true;
  const int64_t* idx;
  __device__ float load(int64_t j, int64_t r) const { return static_cast<float>((idx[r] >> j) & 1); }
};

// A layer's output y = s * rstd * gain (+ the residual) from its silu s and the RMSNorm partial sums of s^2, as
// the next product's operand. The blocks of the first column tile (blockIdx.y == 0), which load every element of
// their rows once, also store y (and rstd) for the layers after (residual) and the backward.
struct Normalized {
  static constexpr bool kKContiguous = true;
  const float* s;         // [N, H]
  const float* gain;      // [H]
  const float* residual;  // [N, H] or nullptr
  const float* sumsq;     // [N, T]
  int64_t tiles, hidden;
  float eps;
  float* y_out;           // [N, H]
  float* rstd_out;        // [N] or nullptr
  const float* rstd_rows = nullptr;
  int64_t i0 = 0;

  __device__ void prepare(float* rows, int64_t first, int64_t i_end) {
    for (int i = threadIdx.x; i < kTileM; i += kThreads) {
      const int64_t r = first + i;
      float rstd = 0.0f;
      if (r < i_end) {
        float sum = 0.0f;
        for (int64_t t = 0; t < tiles; ++t) sum += sumsq[r * tiles + t];
        rstd = rsqrtf(sum / static_cast<float>(hidden) + eps);
        if (rstd_out != nullptr && blockIdx.y == 0) rstd_out[r] = rstd;
      }
      rows[i] = rstd;
    }
    rstd_rows = rows;
    i0 = first;
  }

  __device__ float load(int64_t r, int64_t k) const {
    const int64_t at = r * hidden + k;
    float v = s[at] * rstd_rows[r - i0] * gain[k];
    if (residual != nullptr) v += residual[at];
    if (blockIdx.y == 0) y_out[at] = v;
    return v;
  }
};

// dL/dz of a layer from dL/dy (its output's gradient): the RMSNorm and SiLU backward,
//   dz = silu'(z) * rstd * (dy * gain - s * rstd^2 * a / H),   a = sum over the row of dy * gain * s,
// a from the per-tile partials the product that made dy left. Blocks with blockIdx.y == 0 store dz (bf16) for
// the weight gradient.
struct SiluNormGrad {
  static constexpr bool kKContiguous = true;
  const float* dy;       // [N, H]
  const float* z;        // [N, H]
  const float* s;        // [N, H]
  const float* gain;     // [H]
  const float* rstd;     // [N]
  const float* rowdot;   // [N, T]
  int64_t tiles, hidden;
  __nv_bfloat16* dz_out;  // [N, H]
  const float* rows_ = nullptr;
  int64_t i0 = 0;

  __device__ void prepare(float* rows, int64_t first, int64_t i_end) {
    for (int i = threadIdx.x; i < kTileM; i += kThreads) {
      const int64_t r = first + i;
      float scale = 0.0f, coef = 0.0f;
      if (r < i_end) {
        float a = 0.0f;
        for (int64_t t = 0; t < tiles; ++t) a += rowdot[r * tiles + t];
        scale = rstd[r];
        coef = scale * scale * scale * a / static_cast<float>(hidden);
      }
      rows[i] = scale;
      rows[kTileM + i] = coef;
    }
    rows_ = rows;
    i0 = first;
  }

  __device__ float load(int64_t r, int64_t k) const {
    const int64_t at = r * hidden + k;
    const float zz = z[at];
    const float sig = sigmoid(zz);
    const float dsilu = sig * (1.0f + zz * (1.0f - sig));
    const float v = dsilu * (rows_[r - i0] * dy[at] * gain[k] - rows_[kTileM + (r - i0)] * s[at]);
    if (blockIdx.y == 0) dz_out[at] = __float2bfloat16_rn(v);
    return v;
  }
};

// ----------------------------------------------------------------------------------------------- epilogues
// operator()(acc, scratch, i0, n0, M, N): acc is the block's tile [kTileM][kLdc] in shared memory (after a
// barrier), scratch [kWarps * kTileN] floats of shared memory; every thread of the block calls it. Warp w handles
// rows w * kRowsPerWarp .. (w + 1) * kRowsPerWarp - 1 of the tile, lane l columns l and l + 32 (coalesced stores).

// A layer's product: z = acc + bias, s = silu(z); stores s (and z) and each row's sum of s^2 over the tile.
struct SiluStore {
  const float* bias;  // [H]
  float* s;           // [N, H]
  float* z;           // [N, H] or nullptr
  float* sumsq;       // [N, T]
  int64_t tiles, hidden;

  __device__ void operator()(const float* acc, float*, int64_t i0, int64_t n0, int64_t m, int64_t n) const {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int row = warp * kRowsPerWarp + i;
      const int64_t r = i0 + row;
      if (r >= m) break;  // the same for the whole warp
      float squares = 0.0f;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int col = lane + 32 * half;
        const int64_t c = n0 + col;
        if (c < n) {
          const float zz = acc[row * kLdc + col] + bias[c];
          const float ss = zz * sigmoid(zz);
          s[r * hidden + c] = ss;
          if (z != nullptr) z[r * hidden + c] = zz;
          squares += ss * ss;
        }
      }
      squares = warp_sum(squares);
      if (lane == 0) sumsq[r * tiles + blockIdx.y] = squares;
    }
  }
};

// The head: logits = acc + bias.
struct BiasStore {
  const float* bias;  // [V]
  float* out;         // [N, V]

  __device__ void operator()(const float* acc, float*, int64_t i0, int64_t n0, int64_t m, int64_t n) const {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int row = warp * kRowsPerWarp + i;
      const int64_t r = i0 + row;
      if (r >= m) break;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int col = lane + 32 * half;
        const int64_t c = n0 + col;
        if (c < n) out[r * n + c] = acc[row * kLdc + col] + bias[c];
      }
    }
  }
};

// dL/dy of a layer (the product dz_next @ W_next, or dlogits @ W_out, plus the residual's gradient): stores dy,
// each row's sum over the tile of dy * gain * s (for that layer's RMSNorm backward) and, per column, the tile's
// sum over its rows of dy * s * rstd (the gain's gradient: row tile x's partials at gain_partials + x * gain_stride).
struct GradStore {
  const float* residual;  // [N, H] dL/dy of the layer this one feeds through the residual, or nullptr
  float* dy;              // [N, H]
  const float* gain;      // [H]
  const float* s;         // [N, H]
  const float* rstd;      // [N]
  float* rowdot;          // [N, T]
  float* gain_partials;   // [row tiles, gain_stride]
  int64_t gain_stride, tiles, hidden;

  __device__ void operator()(const float* acc, float* scratch, int64_t i0, int64_t n0, int64_t m, int64_t n) const {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float columns[2] = {0.0f, 0.0f};
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int row = warp * kRowsPerWarp + i;
      const int64_t r = i0 + row;
      if (r >= m) break;
      const float scale = rstd[r];
      float dot = 0.0f;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int col = lane + 32 * half;
        const int64_t c = n0 + col;
        if (c < n) {
          const int64_t at = r * hidden + c;
          float v = acc[row * kLdc + col];
          if (residual != nullptr) v += residual[at];
          dy[at] = v;
          const float sv = s[at];
          dot += v * gain[c] * sv;
          columns[half] += v * sv * scale;
        }
      }
      dot = warp_sum(dot);
      if (lane == 0) rowdot[r * tiles + blockIdx.y] = dot;
    }
    scratch[warp * kTileN + lane] = columns[0];
    scratch[warp * kTileN + lane + 32] = columns[1];
    __syncthreads();
    if (threadIdx.x < kTileN) {
      const int64_t c = n0 + threadIdx.x;
      if (c < n) {
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) sum += scratch[w * kTileN + threadIdx.x];
        gain_partials[static_cast<int64_t>(blockIdx.x) * gain_stride + c] = sum;
      }
    }
  }
};

// A weight gradient's split: partial [M, N] of split blockIdx.z at out + blockIdx.z * slice.
struct PartialStore {
  float* out;
  int64_t slice;

  __device__ void operator()(const float* acc, float*, int64_t i0, int64_t n0, int64_t m, int64_t n) const {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float* part = out + static_cast<int64_t>(blockIdx.z) * slice;
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int row = warp * kRowsPerWarp + i;
      const int64_t r = i0 + row;
      if (r >= m) break;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int col = lane + 32 * half;
        const int64_t c = n0 + col;
        if (c < n) part[r * n + c] = acc[row * kLdc + col];
      }
    }
  }
};

// ----------------------------------------------------------------------------------------------- the product

// Operand tile element e (0 .. kTileM * kTileK) of thread t at e = t + j * kThreads: along k first when the
// operand is k-contiguous (a warp reads 32 adjacent k of one row), else along i (32 adjacent rows of one k).
template <bool kKContig>
__device__ __forceinline__ void tile_position(int j, int& row, int& kk) {
  const int e = static_cast<int>(threadIdx.x) + j * kThreads;
  row = kKContig ? e / kTileK : e % kTileM;
  kk = kKContig ? e % kTileK : e / kTileM;
}

template <class Operand>
__device__ __forceinline__ void load_tile(const Operand& op, int64_t i0, int64_t i_end, int64_t k0, int64_t k_end,
                                          float (&regs)[kLoadsPerThread]) {
#pragma unroll
  for (int j = 0; j < kLoadsPerThread; ++j) {
    int row, kk;
    tile_position<Operand::kKContiguous>(j, row, kk);
    const int64_t i = i0 + row, k = k0 + kk;
    regs[j] = (i < i_end && k < k_end) ? op.load(i, k) : 0.0f;
  }
}

template <class Operand>
__device__ __forceinline__ void store_tile(const float (&regs)[kLoadsPerThread], __nv_bfloat16* tile) {
#pragma unroll
  for (int j = 0; j < kLoadsPerThread; ++j) {
    int row, kk;
    tile_position<Operand::kKContiguous>(j, row, kk);
    tile[row * kLds + kk] = __float2bfloat16_rn(regs[j]);
  }
}

// grid (ceil(M / kTileM), ceil(N / kTileN), splits); split z sums k in [z * k_chunk, min(K, (z + 1) * k_chunk)).
// kRowSums (weight gradients, whose A is i-contiguous): the blocks of column tile 0 also store the sum over their
// k of A's rows, unrounded (the bias gradient), at row_sums + z * row_sums_slice.
// __launch_bounds__(kThreads, 1): ptxas's own choice capped some instances at 128 registers and spilled; with one
// block per SM guaranteed they take 140-168 registers and spill nothing (WIDE.md, compile report).
template <class A, class B, class Epilogue, bool kRowSums>
__global__ void __launch_bounds__(kThreads, 1) product_kernel(A a, B b, Epilogue epilogue, int64_t m, int64_t n,
                                                           int64_t k, int64_t k_chunk, float* row_sums,
                                                           int64_t row_sums_slice) {
  static_assert(!kRowSums || !A::kKContiguous, "row sums need each thread on fixed rows of A");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 tensor cores need sm_80 or later (cuda_wide.unavailable_reason refuses older GPUs)
#else
  using namespace nvcuda;
  __shared__ __align__(128) __nv_bfloat16 a_tile[kTileM * kLds];
  __shared__ __align__(128) __nv_bfloat16 b_tile[kTileN * kLds];
  __shared__ __align__(128) float acc_tile[kTileM * kLdc];
  __shared__ float rows[2 * kTileM];
  __shared__ float scratch[kWarps * kTileN];

  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTileN;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * k_chunk;
  const int64_t k_end = k_begin + k_chunk < k ? k_begin + k_chunk : k;
  const int warp = threadIdx.x / 32, warp_m = warp / (kTileN / kWarpTileN), warp_n = warp % (kTileN / kWarpTileN);

  a.prepare(rows, i0, m);
  __syncthreads();

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) wmma::fill_fragment(acc[i], 0.0f);

  float a_regs[kLoadsPerThread], b_regs[kLoadsPerThread];
  float row_sum = 0.0f;
  if (k_begin < k_end) {
    load_tile(a, i0, m, k_begin, k_end, a_regs);
    load_tile(b, n0, n, k_begin, k_end, b_regs);
  }
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kTileK) {
    if (kRowSums) {
#pragma unroll
      for (int j = 0; j < kLoadsPerThread; ++j) row_sum += a_regs[j];
    }
    store_tile<A>(a_regs, a_tile);
    store_tile<B>(b_regs, b_tile);
    __syncthreads();
    if (k0 + kTileK < k_end) {  // the next stage's loads fly while this stage multiplies
      load_tile(a, i0, m, k0 + kTileK, k_end, a_regs);
      load_tile(b, n0, n, k0 + kTileK, k_end, b_regs);
    }
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a_frag;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b_frag;
      wmma::load_matrix_sync(b_frag, b_tile + (warp_n * kWarpTileN) * kLds + kk, kLds);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(a_frag, a_tile + (warp_m * kWarpTileM + i * 16) * kLds + kk, kLds);
        wmma::mma_sync(acc[i], a_frag, b_frag, acc[i]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
    wmma::store_matrix_sync(acc_tile + (warp_m * kWarpTileM + i * 16) * kLdc + warp_n * kWarpTileN, acc[i], kLdc,
                            wmma::mem_row_major);
  if (kRowSums) {  // thread t loaded row t % kTileM of A (i-contiguous mapping): kThreads / kTileM threads per row
    scratch[threadIdx.x] = row_sum;
    __syncthreads();
    if (blockIdx.y == 0 && threadIdx.x < kTileM && i0 + threadIdx.x < m) {
      float sum = 0.0f;
#pragma unroll
      for (int t = threadIdx.x; t < kThreads; t += kTileM) sum += scratch[t];
      row_sums[static_cast<int64_t>(blockIdx.z) * row_sums_slice + i0 + threadIdx.x] = sum;
    }
  }
  __syncthreads();
  epilogue(acc_tile, scratch, i0, n0, m, n);
#endif
}

// Computes operand A's values of rows [blockIdx.x * kTileM, +kTileM) x [0, k) for their side effects (dz of the
// input layer, which has no product of its own to fuse into). grid (ceil(M / kTileM)), kThreads threads.
template <class A>
__global__ void __launch_bounds__(kThreads) materialize_kernel(A a, int64_t m, int64_t k) {
  __shared__ float rows[2 * kTileM];
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  a.prepare(rows, i0, m);
  __syncthreads();
  for (int64_t e = threadIdx.x; e < kTileM * k; e += kThreads) {
    const int64_t i = i0 + e / k;
    if (i < m) a.load(i, e % k);
  }
}

template <class A, class B, class Epilogue, bool kRowSums = false>
cudaError_t launch_product(const A& a, const B& b, const Epilogue& epilogue, int64_t m, int64_t n, int64_t k,
                           Split split, float* row_sums, int64_t row_sums_slice, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(m, kTileM)), static_cast<unsigned>(ceil_div(n, kTileN)),
                  static_cast<unsigned>(split.splits));
  product_kernel<A, B, Epilogue, kRowSums>
      <<<grid, kThreads, 0, stream>>>(a, b, epilogue, m, n, k, split.chunk, row_sums, row_sums_slice);
  return cudaGetLastError();
}

// A product without splits: one block per output tile sums all of k.
template <class A, class B, class Epilogue>
cudaError_t launch_product(const A& a, const B& b, const Epilogue& epilogue, int64_t m, int64_t n, int64_t k,
                           cudaStream_t stream) {
  return launch_product<A, B, Epilogue, false>(a, b, epilogue, m, n, k, Split{1, k}, nullptr, 0, stream);
}

}  // namespace aunn_wide
