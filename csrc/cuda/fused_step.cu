// The fused AUNN on CUDA for hidden widths H in {16, 32, 64, 128} and vocabularies up to 256 (DESIGN.md beside
// this file): one kernel per call that runs the forward (index bits, every layer, the head) and, in the backward
// modes, the loss, the backward and every parameter's gradient, for 16 rows per warp at a time.
//
// Products: mma.sync m16n8k16, bf16 operands (rounded to nearest even), fp32 accumulation. Elementwise math
// (bias, SiLU, RMSNorm, gain, residual, softmax) is fp32. Fragment layouts (PTX ISA, "mma.m16n8k16"), with
// g = lane / 4 and t = lane % 4:
//   A 16x16 row-major, 4 x b32: a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   B 16x8 (k x n),    2 x b32: b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   C 16x8 fp32,       4 x f32: c0 = C[g][2t], c1 = C[g][2t+1], c2 = C[g+8][2t], c3 = C[g+8][2t+1]
// so the C fragments of two adjacent 8-column tiles, rounded to bf16 pairs, are the A fragment of the next
// product's 16-wide k chunk: a layer's output stays in registers as the next layer's input.
#include "fused_step.h"

#include <cstddef>
#include <cstdint>

namespace aunn_cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kMaxWarps = 8;
constexpr int kMaxThreads = 32 * kMaxWarps;
constexpr int kBitColumns = 64;       // the input layer's K: the index bits, zero past `bits`
constexpr int kPad = 8;               // bf16 elements added to each shared-memory row (ldmatrix without conflicts)
constexpr int kVocabChunk = 64;       // logits computed 64 columns at a time
constexpr float kNegInf = -__builtin_huge_valf();

__host__ __device__ constexpr bool is_backward(StepMode mode) {
  return mode == StepMode::kLossGrad || mode == StepMode::kLogitsGrad;
}

// ----------------------------------------------------------------------------- shared-memory layout

struct Layout {
  size_t weights, res, acc, idx, act, dz, dy, total;  // byte offsets, and the total
  int weight_elems;                               // bf16 elements of one of the two weight buffers
  int dz_stride;                                  // bf16 elements per row of the dz buffer
};

__host__ __device__ constexpr size_t align16(size_t bytes) { return (bytes + 15) / 16 * 16; }

__host__ __device__ inline int accumulator_floats(int hidden, int hidden_layers, int vpad) {
  return 2 * hidden + 2 * hidden_layers * hidden + vpad;  // in bias, in gain, hidden biases, hidden gains, out bias
}

// Whether the backward keeps a layer's output gradient in shared memory (fp32 [16][H+8] per warp) while it recomputes
// the layer's product: at H = 128 the two [16][128] fp32 fragment arrays in registers spilled.
__host__ __device__ constexpr bool dy_in_shared_memory(int hidden) { return hidden >= 128; }

// Two weight buffers (the step's weights and the next step's, loaded meanwhile), each warp's fp32 residual stream
// [16, H+8]; in the backward modes also the bias/gain gradient accumulators, the rows' indices, every layer's
// input [layers-1][rows, H+8] bf16 (kept for the backward), one dz [rows, max(H, vpad)+8] bf16 and at H = 128 each
// warp's output gradient [16, H+8] fp32.
__host__ __device__ inline Layout layout_of(int hidden, int hidden_layers, int vocab, bool backward, int warps) {
  const int vpad = padded_vocab(vocab), rows = 16 * warps, stride = hidden + kPad;
  int weight_elems = hidden * (kBitColumns + kPad);
  if (hidden * stride > weight_elems) weight_elems = hidden * stride;
  if (vpad * stride > weight_elems) weight_elems = vpad * stride;
  Layout l{};
  l.weight_elems = weight_elems;
  l.dz_stride = (hidden > vpad ? hidden : vpad) + kPad;
  size_t at = 0;
  l.weights = at;
  at += align16(2 * sizeof(bf16) * static_cast<size_t>(weight_elems));
  l.res = at;
  at += align16(sizeof(float) * static_cast<size_t>(rows) * stride);
  l.acc = l.idx = l.act = l.dz = l.dy = at;
  if (backward) {
    l.acc = at;
    at += align16(sizeof(float) * static_cast<size_t>(accumulator_floats(hidden, hidden_layers, vpad)));
    l.idx = at;
    at += align16(sizeof(int64_t) * static_cast<size_t>(rows));
    l.act = at;
    at += align16(sizeof(bf16) * static_cast<size_t>(hidden_layers + 1) * rows * stride);
    l.dz = at;
    at += align16(sizeof(bf16) * static_cast<size_t>(rows) * l.dz_stride);
    l.dy = at;
    if (dy_in_shared_memory(hidden)) at += align16(sizeof(float) * static_cast<size_t>(rows) * stride);
  }
  l.total = at;
  return l;
}

// ----------------------------------------------------------------------------- PTX wrappers

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_address(dst)), "l"(src) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Four 8x8 bf16 matrices; lane l gives the address of row l % 8 of matrix l / 8, register q holds matrix q.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(p))
               : "memory");
}

// The same, each matrix transposed: the thread of lane l gets rows 2(l%4), 2(l%4)+1 of column l/4.
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(p))
               : "memory");
}

// d += a @ b for one 16x8 tile.
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// (lo, hi) rounded to bf16 (nearest even), lo in the low half: the element of the lower column index.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// 1 / (1 + e^-x) as 0.5 tanh(x / 2) + 0.5: one special-function op (absolute error ~2^-11, inside bf16's).
__device__ __forceinline__ float sigmoid(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;\n" : "=f"(y) : "f"(0.5f * x));
  return fmaf(0.5f, y, 0.5f);
}

// Sum over the 4 lanes of a quad (the threads that share rows g and g+8).
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Sum over the 8 quads (the warp's 16 rows of one column pair).
__device__ __forceinline__ float column_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 4);
  v += __shfl_xor_sync(0xffffffffu, v, 8);
  return v + __shfl_xor_sync(0xffffffffu, v, 16);
}

// bf16 pair of index bits k and k + 1 (1.0 where set, 0 at or past `bits`).
__device__ __forceinline__ uint32_t bit_pair(uint64_t x, int k, int bits) {
  const uint32_t lo = (k < bits && ((x >> k) & 1u)) ? 0x3F80u : 0u;
  const uint32_t hi = (k + 1 < bits && ((x >> (k + 1)) & 1u)) ? 0x3F800000u : 0u;
  return lo | hi;
}

// bf16 pair of bit n of two indices (rows k and k + 1 of a B fragment over rows).
__device__ __forceinline__ uint32_t bit_of_rows(uint64_t x0, uint64_t x1, int n) {
  return (((x0 >> n) & 1u) ? 0x3F80u : 0u) | (((x1 >> n) & 1u) ? 0x3F800000u : 0u);
}

// ----------------------------------------------------------------------------- warp-level products

// C fragments [2 KC][4] (16 rows x 16 KC columns) -> A fragments [KC][4] in bf16.
template <int KC>
__device__ __forceinline__ void to_fragments(uint32_t (&a)[KC][4], const float (&c)[2 * KC][4]) {
#pragma unroll
  for (int kc = 0; kc < KC; ++kc) {
    a[kc][0] = pack_bf16(c[2 * kc][0], c[2 * kc][1]);
    a[kc][1] = pack_bf16(c[2 * kc][2], c[2 * kc][3]);
    a[kc][2] = pack_bf16(c[2 * kc + 1][0], c[2 * kc + 1][1]);
    a[kc][3] = pack_bf16(c[2 * kc + 1][2], c[2 * kc + 1][3]);
  }
}

// A fragments [KC][4] of the warp's 16 rows stored into rows row0..row0+15 of a row-major bf16 matrix.
template <int KC>
__device__ __forceinline__ void store_fragments(bf16* m, int stride, int row0, const uint32_t (&a)[KC][4], int lane) {
  bf16* base = m + (row0 + (lane >> 2)) * stride + 2 * (lane & 3);
#pragma unroll
  for (int kc = 0; kc < KC; ++kc) {
    *reinterpret_cast<uint32_t*>(base + kc * 16) = a[kc][0];
    *reinterpret_cast<uint32_t*>(base + 8 * stride + kc * 16) = a[kc][1];
    *reinterpret_cast<uint32_t*>(base + kc * 16 + 8) = a[kc][2];
    *reinterpret_cast<uint32_t*>(base + 8 * stride + kc * 16 + 8) = a[kc][3];
  }
}

// acc [2 NP][4] += A (16 x 16 KC) @ W[n0 .. n0 + 16 NP - 1][0 .. 16 KC - 1]^T; W row-major [n][k] in shared memory.
template <int KC, int NP>
__device__ __forceinline__ void mma_a_wt(float (&acc)[2 * NP][4], const uint32_t (&a)[KC][4], const bf16* w,
                                         int stride, int n0, int lane) {
  const bf16* rows = w + (n0 + (lane & 7) + ((lane >> 4) << 3)) * stride + ((lane >> 3) & 1) * 8;
#pragma unroll
  for (int kc = 0; kc < KC; ++kc) {
#pragma unroll
    for (int np = 0; np < NP; ++np) {
      uint32_t b[4];
      ldsm_x4(b, rows + np * 16 * stride + kc * 16);
      mma(acc[2 * np], a[kc], b[0], b[1]);
      mma(acc[2 * np + 1], a[kc], b[2], b[3]);
    }
  }
}

// The same with A read from rows row0..row0+15 of a row-major bf16 matrix in shared memory, one k chunk at a time
// (fewer live registers than loading every A fragment first).
template <int KC, int NP>
__device__ __forceinline__ void mma_smem_a_wt(float (&acc)[2 * NP][4], const bf16* m, int m_stride, int row0,
                                              const bf16* w, int stride, int lane) {
  const bf16* a_rows = m + (row0 + (lane & 15)) * m_stride + (lane >> 4) * 8;
  const bf16* w_rows = w + ((lane & 7) + ((lane >> 4) << 3)) * stride + ((lane >> 3) & 1) * 8;
#pragma unroll
  for (int kc = 0; kc < KC; ++kc) {
    uint32_t a[4];
    ldsm_x4(a, a_rows + kc * 16);
#pragma unroll
    for (int np = 0; np < NP; ++np) {
      uint32_t b[4];
      ldsm_x4(b, w_rows + np * 16 * stride + kc * 16);
      mma(acc[2 * np], a, b[0], b[1]);
      mma(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// acc [2 NP][4] += bits @ W_in^T: A[r][k] = bit k of the index of the warp's row g (x[0]) or g + 8 (x[1]), built
// one 16-bit chunk at a time; W_in row-major [n][64] in shared memory.
template <int NP>
__device__ __forceinline__ void mma_bits_wt(float (&acc)[2 * NP][4], const uint64_t (&x)[2], int bits, const bf16* w,
                                            int stride, int lane) {
  const bf16* w_rows = w + ((lane & 7) + ((lane >> 4) << 3)) * stride + ((lane >> 3) & 1) * 8;
#pragma unroll
  for (int kc = 0; kc < kBitColumns / 16; ++kc) {
    const int k = kc * 16 + 2 * (lane & 3);
    const uint32_t a[4] = {bit_pair(x[0], k, bits), bit_pair(x[1], k, bits), bit_pair(x[0], k + 8, bits),
                           bit_pair(x[1], k + 8, bits)};
#pragma unroll
    for (int np = 0; np < NP; ++np) {
      uint32_t b[4];
      ldsm_x4(b, w_rows + np * 16 * stride + kc * 16);
      mma(acc[2 * np], a, b[0], b[1]);
      mma(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// acc [2 NP][4] += A (16 x 16 k-chunk) @ W[k0 .. k0 + 15][0 .. 16 NP - 1]; W row-major [k][n] in shared memory.
template <int NP>
__device__ __forceinline__ void mma_a_w(float (&acc)[2 * NP][4], const uint32_t (&a)[4], const bf16* w, int stride,
                                        int k0, int lane) {
  const bf16* rows = w + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * stride + ((lane >> 4) << 3);
#pragma unroll
  for (int np = 0; np < NP; ++np) {
    uint32_t b[4];
    ldsm_x4_trans(b, rows + np * 16);
    mma(acc[2 * np], a, b[0], b[1]);
    mma(acc[2 * np + 1], a, b[2], b[3]);
  }
}

// part[m][n] += sum over rows r < R of D[r][m] * X[r][n], for m < M (a multiple of 16), n < N (a multiple of 16);
// only m < m_real, n < n_real are written (part's row stride ldp). D: bf16 [R][ds] in shared memory; X: bf16
// [R][xs] in shared memory, or (BITS) the index bits of idx_s[r]. Each warp owns whole 16 x 32 (16 x 16) output
// blocks, so every element of `part` is read and written by one thread only.
template <int N, bool BITS>
__device__ void accumulate_weight_grad(float* part, int ldp, int m_real, int n_real, int M, const bf16* d, int ds,
                                       const bf16* x, int xs, const int64_t* idx_s, int R, int warp, int warps,
                                       int lane) {
  constexpr int NB = N >= 32 ? 32 : 16;  // block width
  constexpr int NT = NB / 8;
  const int g = lane >> 2, t = lane & 3;
  const int blocks_n = N / NB, blocks = (M / 16) * blocks_n;
  for (int blk = warp; blk < blocks; blk += warps) {
    const int m0 = (blk / blocks_n) * 16, n0 = (blk % blocks_n) * NB;
    float c[NT][4] = {};
    for (int r0 = 0; r0 < R; r0 += 16) {
      uint32_t a[4];  // A[m][r] = D[r][m]: matrices (rows r0.., col m0), (r0.., m0+8), (r0+8.., m0), (r0+8.., m0+8)
      ldsm_x4_trans(a, d + (r0 + (lane & 7) + ((lane >> 4) << 3)) * ds + m0 + ((lane >> 3) & 1) * 8);
      if constexpr (BITS) {
        const uint64_t x0 = static_cast<uint64_t>(idx_s[r0 + 2 * t]), x1 = static_cast<uint64_t>(idx_s[r0 + 2 * t + 1]);
        const uint64_t x2 = static_cast<uint64_t>(idx_s[r0 + 2 * t + 8]);
        const uint64_t x3 = static_cast<uint64_t>(idx_s[r0 + 2 * t + 9]);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int bit = n0 + nt * 8 + g;
          mma(c[nt], a, bit_of_rows(x0, x1, bit), bit_of_rows(x2, x3, bit));
        }
      } else {
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
          uint32_t b[4];  // B[r][n] = X[r][n]: matrices (r0.., n0), (r0+8.., n0), (r0.., n0+8), (r0+8.., n0+8)
          ldsm_x4_trans(b, x + (r0 + (lane & 7) + ((lane >> 3) & 1) * 8) * xs + n0 + np * 16 + ((lane >> 4) << 3));
          mma(c[2 * np], a, b[0], b[1]);
          mma(c[2 * np + 1], a, b[2], b[3]);
        }
      }
    }
    // every load before the first store, so that the block's L2 round trips overlap (the compiler cannot prove
    // that a store does not alias a later load)
    float old[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = m0 + g + (e >> 1) * 8, n = n0 + nt * 8 + 2 * t + (e & 1);
        old[nt][e] = m < m_real && n < n_real ? part[static_cast<int64_t>(m) * ldp + n] : 0.0f;
      }
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = m0 + g + (e >> 1) * 8, n = n0 + nt * 8 + 2 * t + (e & 1);
        if (m < m_real && n < n_real) part[static_cast<int64_t>(m) * ldp + n] = old[nt][e] + c[nt][e];
      }
    }
  }
}

// ----------------------------------------------------------------------------- layer epilogues (fp32)

// z [NT][4] (the product, no bias) -> RMSNorm(SiLU(z + bias)) * gain, in place. Rows g and g+8 of the warp's 16.
template <int H>
__device__ __forceinline__ void silu_rmsnorm(float (&z)[H / 8][4], const float* bias, const float* gain, float eps,
                                             int lane) {
  const int t = lane & 3;
  float sumsq[2] = {0.0f, 0.0f};
#pragma unroll
  for (int nt = 0; nt < H / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float v = z[nt][e] + __ldg(bias + nt * 8 + 2 * t + (e & 1));
      const float s = v * sigmoid(v);
      z[nt][e] = s;
      sumsq[e >> 1] = fmaf(s, s, sumsq[e >> 1]);
    }
  }
  float r[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) r[h] = rsqrtf(quad_sum(sumsq[h]) / H + eps);
#pragma unroll
  for (int nt = 0; nt < H / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) z[nt][e] = z[nt][e] * r[e >> 1] * __ldg(gain + nt * 8 + 2 * t + (e & 1));
  }
}

// The backward of silu_rmsnorm for the warp's rows g and g+8: z [NT][4] the recomputed product (no bias) is replaced
// by dz, the gradient of z; dy(nt, e) gives the gradient of the layer's output at fragment element (nt, e). The
// column sums over the warp's rows of d gain (dy s r) and d bias (dz) are added to acc_gain / acc_bias in shared
// memory.
template <int H, typename Dy>
__device__ __forceinline__ void silu_rmsnorm_backward(float (&z)[H / 8][4], const Dy& dy, const float* bias,
                                                      const float* gain, float eps, float* acc_bias, float* acc_gain,
                                                      int lane) {
  const int g = lane >> 2, t = lane & 3;
  float sumsq[2] = {0.0f, 0.0f}, dot[2] = {0.0f, 0.0f};  // per row: sum s^2, sum gain dy s
#pragma unroll
  for (int nt = 0; nt < H / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = nt * 8 + 2 * t + (e & 1);
      const float v = z[nt][e] + __ldg(bias + col);
      const float s = v * sigmoid(v);
      z[nt][e] = v;
      sumsq[e >> 1] = fmaf(s, s, sumsq[e >> 1]);
      dot[e >> 1] = fmaf(__ldg(gain + col) * dy(nt, e), s, dot[e >> 1]);
    }
  }
  float r[2], c[2];  // rsqrt(mean s^2 + eps); r^3 (sum gain dy s) / H
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    r[h] = rsqrtf(quad_sum(sumsq[h]) / H + eps);
    c[h] = r[h] * r[h] * r[h] * quad_sum(dot[h]) / H;
  }
#pragma unroll
  for (int nt = 0; nt < H / 8; ++nt) {
    float dgain[2] = {0.0f, 0.0f}, dbias[2] = {0.0f, 0.0f};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = nt * 8 + 2 * t + (e & 1);
      const float v = z[nt][e];
      const float sig = sigmoid(v);
      const float s = v * sig;
      const float d = dy(nt, e);
      const float ds = r[e >> 1] * __ldg(gain + col) * d - s * c[e >> 1];
      const float dz = ds * sig * fmaf(v, 1.0f - sig, 1.0f);
      dgain[e & 1] = fmaf(d * s, r[e >> 1], dgain[e & 1]);
      dbias[e & 1] += dz;
      z[nt][e] = dz;
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float sg = column_sum(dgain[i]), sb = column_sum(dbias[i]);
      if (g == 0) {
        atomicAdd(acc_gain + nt * 8 + 2 * t + i, sg);
        atomicAdd(acc_bias + nt * 8 + 2 * t + i, sb);
      }
    }
  }
}

// Residual stream of the warp's rows in shared memory (fp32 [16][H + kPad]): load adds it to x, store writes x.
template <int H>
__device__ __forceinline__ void add_residual(float (&x)[H / 8][4], const float* res, int lane) {
  const float* base = res + (lane >> 2) * (H + kPad) + 2 * (lane & 3);
#pragma unroll
  for (int nt = 0; nt < H / 8; ++nt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float2 v = *reinterpret_cast<const float2*>(base + h * 8 * (H + kPad) + nt * 8);
      x[nt][2 * h] += v.x;
      x[nt][2 * h + 1] += v.y;
    }
  }
}

template <int H>
__device__ __forceinline__ void store_residual(float* res, const float (&x)[H / 8][4], int lane) {
  float* base = res + (lane >> 2) * (H + kPad) + 2 * (lane & 3);
#pragma unroll
  for (int nt = 0; nt < H / 8; ++nt) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
      *reinterpret_cast<float2*>(base + h * 8 * (H + kPad) + nt * 8) = make_float2(x[nt][2 * h], x[nt][2 * h + 1]);
  }
}

// The gradient of a layer's output for silu_rmsnorm_backward: in registers, or (H = 128, where registers cannot
// hold it beside the recomputed product) in the warp's fp32 [16][H + kPad] buffer, read with volatile loads so that
// the compiler reloads it in the second pass instead of keeping the first pass's values.
template <int H>
struct RegisterDy {
  const float (&d)[H / 8][4];
  __device__ __forceinline__ float operator()(int nt, int e) const { return d[nt][e]; }
};

template <int H>
struct SharedDy {
  const volatile float* base;  // the buffer + row g, column 2t
  __device__ __forceinline__ float operator()(int nt, int e) const {
    return base[(e >> 1) * 8 * (H + kPad) + nt * 8 + (e & 1)];
  }
};

// ----------------------------------------------------------------------------- the head

// Logits of columns c0 .. c0 + 63 for the warp's rows: lg [8][4]; columns >= V are -inf.
template <int H>
__device__ __forceinline__ void head_logits(float (&lg)[8][4], const uint32_t (&h)[H / 16][4], const bf16* w_out,
                                            const float* out_bias, int c0, int vocab, int vpad, int lane) {
  const int t = lane & 3;
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) lg[nt][0] = lg[nt][1] = lg[nt][2] = lg[nt][3] = 0.0f;
#pragma unroll
  for (int np = 0; np < 4; ++np) {
    if (c0 + np * 16 < vpad) {
      float pair[2][4] = {};
      mma_a_wt<H / 16, 1>(pair, h, w_out, H + kPad, c0 + np * 16, lane);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        lg[2 * np][e] = pair[0][e];
        lg[2 * np + 1][e] = pair[1][e];
      }
    }
  }
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = c0 + nt * 8 + 2 * t + (e & 1);
      lg[nt][e] = col < vocab ? lg[nt][e] + __ldg(out_bias + col) : kNegInf;
    }
  }
}

// Per row (h = 0: row g, 1: row g+8): the max logit m, the sum over the non-target columns of exp(logit - m), the
// target's logit (-inf in the lanes that do not hold it). Kept apart so that a confident row keeps its digits:
// its loss is log1p(others) and its target gradient -others / sum.
struct SoftmaxStats {
  float m[2] = {kNegInf, kNegInf};
  float others[2] = {0.0f, 0.0f};
  float target_logit[2] = {kNegInf, kNegInf};
};

__device__ __forceinline__ void update_stats(SoftmaxStats& st, const float (&lg)[8][4], int c0, int vocab,
                                             const int (&target)[2], int lane) {
  const int t = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float chunk_max = kNegInf;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) chunk_max = fmaxf(chunk_max, fmaxf(lg[nt][2 * h], lg[nt][2 * h + 1]));
    const float m = fmaxf(st.m[h], chunk_max);
    if (m != st.m[h]) st.others[h] *= __expf(st.m[h] - m);
    st.m[h] = m;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int col = c0 + nt * 8 + 2 * t + i;
        if (col >= vocab) continue;
        if (col == target[h])
          st.target_logit[h] = lg[nt][2 * h + i];
        else
          st.others[h] += __expf(lg[nt][2 * h + i] - m);
      }
    }
  }
}

// Combine the 4 lanes of each quad: afterwards every lane holds its rows' statistics.
__device__ __forceinline__ void reduce_stats(SoftmaxStats& st) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int offset = 1; offset <= 2; offset <<= 1) {
      const float om = __shfl_xor_sync(0xffffffffu, st.m[h], offset);
      const float oo = __shfl_xor_sync(0xffffffffu, st.others[h], offset);
      const float ot = __shfl_xor_sync(0xffffffffu, st.target_logit[h], offset);
      const float m = fmaxf(st.m[h], om);
      st.others[h] = (st.m[h] == m ? st.others[h] : st.others[h] * __expf(st.m[h] - m)) +
                     (om == m ? oo : oo * __expf(om - m));
      st.m[h] = m;
      st.target_logit[h] = fmaxf(st.target_logit[h], ot);
    }
  }
}

__device__ __forceinline__ float row_loss(const SoftmaxStats& st, int h) {
  const float m = st.m[h], tl = st.target_logit[h], others = st.others[h];
  return tl >= m ? log1pf(others) : (m - tl) + logf(__expf(tl - m) + others);
}

// ----------------------------------------------------------------------------- the kernel

template <int H, StepMode MODE>
__global__ void __launch_bounds__(kMaxThreads, 1) fused_step_kernel(const StepProblem p, const StepArgs args) {
  constexpr bool kBackward = is_backward(MODE);
  constexpr bool kLossMode = MODE == StepMode::kLoss || MODE == StepMode::kLossGrad;
  constexpr int NT = H / 8, KC = H / 16, S = H + kPad, IN_STRIDE = kBitColumns + kPad;
  extern __shared__ __align__(16) unsigned char smem[];

  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, t = lane & 3;
  const int R = 16 * warps, nh = p.hidden_layers, vocab = p.vocab, vpad = padded_vocab(vocab), bits = p.bits;
  const Layout l = layout_of(H, nh, vocab, kBackward, warps);
  bf16* const wbuf = reinterpret_cast<bf16*>(smem + l.weights);  // two buffers of l.weight_elems
  float* const res = reinterpret_cast<float*>(smem + l.res) + warp * 16 * S;
  float* const acc = reinterpret_cast<float*>(smem + l.acc);
  int64_t* const idx_s = reinterpret_cast<int64_t*>(smem + l.idx);
  bf16* const act = reinterpret_cast<bf16*>(smem + l.act);  // [nh + 1][R][S]: each layer's input
  bf16* const dz_s = reinterpret_cast<bf16*>(smem + l.dz);  // [R][dz_stride]
  const int dzs = l.dz_stride;
  constexpr bool kDyShared = dy_in_shared_memory(H);
  float* const dy_s = reinterpret_cast<float*>(smem + l.dy) + warp * 16 * S;  // kDyShared only

  // gradient row of this CTA; offsets of each parameter's gradient (StepProblem: grad_floats)
  float* const part = kBackward ? args.partials + static_cast<int64_t>(blockIdx.x) * grad_floats(p) : nullptr;
  const int64_t o_in_w = 0, o_hid_w = static_cast<int64_t>(H) * bits + 2 * H;
  const int64_t o_out_w = o_hid_w + static_cast<int64_t>(nh) * H * H + 2LL * nh * H;
  float* const acc_in_b = acc;
  float* const acc_in_g = acc + H;
  float* const acc_hid_b = acc + 2 * H;
  float* const acc_hid_g = acc + 2 * H + nh * H;
  float* const acc_out_b = acc + 2 * H + 2 * nh * H;

  const int64_t ntiles = (p.n + R - 1) / R;
  if (static_cast<int64_t>(blockIdx.x) >= ntiles) return;

  if constexpr (kBackward) {
    for (int i = threadIdx.x; i < accumulator_floats(H, nh, vpad); i += blockDim.x) acc[i] = 0.0f;
  }

  // Weight pipeline: every step waits for its weights (cp.async), then one barrier (all warps are done with the
  // previous step, whose buffer the next step's weights then overwrite while this step computes).
  const bf16* const w_in = args.weights;
  const bf16* const w_hidden = w_in + H * kBitColumns;
  const bf16* const w_out = w_hidden + static_cast<int64_t>(nh) * H * H;
  int next = 0;  // the buffer the next prefetch fills
  auto prefetch = [&](const bf16* src, int rows, int cols) {
    bf16* dst = wbuf + next * l.weight_elems;
    const int chunks_per_row = cols / 8;
    for (int c = threadIdx.x; c < rows * chunks_per_row; c += blockDim.x) {
      const int r = c / chunks_per_row, k = c - r * chunks_per_row;
      cp_async16(dst + r * (cols + kPad) + k * 8, src + static_cast<int64_t>(c) * 8);
    }
    cp_async_commit();
  };
  auto prefetch_in = [&] { prefetch(w_in, H, kBitColumns); };
  auto prefetch_hidden = [&](int j) { prefetch(w_hidden + static_cast<int64_t>(j) * H * H, H, H); };  // 0-based
  auto prefetch_out = [&] { prefetch(w_out, vpad, H); };
  auto begin_step = [&]() -> const bf16* {
    cp_async_wait_all();
    __syncthreads();
    const bf16* w = wbuf + next * l.weight_elems;
    next ^= 1;
    return w;
  };

  // z (the recomputed product) -> dz, with dh the gradient of the layer's output (read from dy_s at H = 128)
  auto layer_backward = [&](float (&z)[NT][4], const float (&dh)[NT][4], const float* bias, const float* gain,
                            float* acc_bias, float* acc_gain) {
    if constexpr (kDyShared) {
      const SharedDy<H> dy{dy_s + g * S + 2 * t};
      silu_rmsnorm_backward<H>(z, dy, bias, gain, p.eps, acc_bias, acc_gain, lane);
    } else {
      const RegisterDy<H> dy{dh};
      silu_rmsnorm_backward<H>(z, dy, bias, gain, p.eps, acc_bias, acc_gain, lane);
    }
  };

  prefetch_in();
  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const bool more_tiles = tile + gridDim.x < ntiles;

    // ---- input layer: z = bits @ W_in^T
    const bf16* w = begin_step();
    if (nh > 0)
      prefetch_hidden(0);
    else
      prefetch_out();
    const int64_t row0 = tile * R + warp * 16;
    const int64_t rows[2] = {row0 + g, row0 + g + 8};
    const bool valid[2] = {rows[0] < p.n, rows[1] < p.n};
    uint64_t x[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) x[h] = valid[h] ? static_cast<uint64_t>(args.idx[rows[h]]) : 0u;
    if constexpr (kBackward) {
      if (t == 0) {
        idx_s[warp * 16 + g] = static_cast<int64_t>(x[0]);
        idx_s[warp * 16 + g + 8] = static_cast<int64_t>(x[1]);
      }
    }
    uint32_t hf[KC][4];  // the current layer output as the next product's A fragments
    {
      float z[NT][4] = {};
      mma_bits_wt<NT / 2>(z, x, bits, w, IN_STRIDE, lane);
      silu_rmsnorm<H>(z, args.in_bias, args.in_gain, p.eps, lane);
      store_residual<H>(res, z, lane);
      to_fragments<KC>(hf, z);
      if constexpr (kBackward) store_fragments<KC>(act, S, warp * 16, hf, lane);
    }

    // ---- hidden layers 1 .. nh (1-based j; hidden_* row j - 1)
    for (int j = 1; j <= nh; ++j) {
      w = begin_step();
      if (j < nh)
        prefetch_hidden(j);
      else
        prefetch_out();
      float z[NT][4] = {};
      mma_a_wt<KC, NT / 2>(z, hf, w, S, 0, lane);
      silu_rmsnorm<H>(z, args.hidden_bias + (j - 1) * H, args.hidden_gain + (j - 1) * H, p.eps, lane);
      if (j % p.residual_every == 0) {
        add_residual<H>(z, res, lane);
        store_residual<H>(res, z, lane);
      }
      to_fragments<KC>(hf, z);
      if constexpr (kBackward) store_fragments<KC>(act + static_cast<int64_t>(j) * R * S, S, warp * 16, hf, lane);
    }

    // ---- head
    w = begin_step();
    if constexpr (kBackward) {
      if (nh > 0)
        prefetch_hidden(nh - 1);
      else
        prefetch_in();
    } else if (more_tiles) {
      prefetch_in();
    }
    int target[2] = {0, 0};
    if constexpr (kLossMode) {
#pragma unroll
      for (int h = 0; h < 2; ++h) target[h] = valid[h] ? static_cast<int>(args.targets[rows[h]]) : 0;
    }
    SoftmaxStats st;
    float best[2] = {kNegInf, kNegInf};
    int best_col[2] = {0x7fffffff, 0x7fffffff};
    if constexpr (MODE != StepMode::kLogitsGrad) {
      for (int c0 = 0; c0 < vpad; c0 += kVocabChunk) {
        float lg[8][4];
        head_logits<H>(lg, hf, w, args.out_bias, c0, vocab, vpad, lane);
        if constexpr (MODE == StepMode::kLogits) {
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int col = c0 + nt * 8 + 2 * t + (e & 1);
              if (valid[e >> 1] && col < vocab) args.logits_out[rows[e >> 1] * vocab + col] = lg[nt][e];
            }
          }
        } else if constexpr (MODE == StepMode::kArgmax) {
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int col = c0 + nt * 8 + 2 * t + (e & 1);
              if (col < vocab && lg[nt][e] > best[e >> 1]) {
                best[e >> 1] = lg[nt][e];
                best_col[e >> 1] = col;
              }
            }
          }
        } else {
          update_stats(st, lg, c0, vocab, target, lane);
        }
      }
    }
    if constexpr (MODE == StepMode::kArgmax) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int offset = 1; offset <= 2; offset <<= 1) {
          const float ob = __shfl_xor_sync(0xffffffffu, best[h], offset);
          const int oc = __shfl_xor_sync(0xffffffffu, best_col[h], offset);
          if (ob > best[h] || (ob == best[h] && oc < best_col[h])) {
            best[h] = ob;
            best_col[h] = oc;
          }
        }
        if (t == 0 && valid[h]) args.argmax_out[rows[h]] = best_col[h];
      }
    }
    if constexpr (kLossMode) {
      reduce_stats(st);
#pragma unroll
      for (int h = 0; h < 2; ++h)
        if (t == 0 && valid[h]) args.row_loss[rows[h]] = row_loss(st, h);
    }

    if constexpr (kBackward) {
      // dlogits, dh = dlogits @ W_out, d out_bias; dlogits (bf16) to shared memory for d out_weight
      float dh[NT][4] = {};
      float weight[2] = {0.0f, 0.0f}, total[2] = {1.0f, 1.0f};
      if constexpr (MODE == StepMode::kLossGrad) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          weight[h] = valid[h] ? args.row_weight[rows[h] * args.row_weight_stride] : 0.0f;
          total[h] = __expf(st.target_logit[h] - st.m[h]) + st.others[h];
        }
      }
      for (int c0 = 0; c0 < vpad; c0 += kVocabChunk) {
        float dl[8][4];
        if constexpr (MODE == StepMode::kLossGrad) {
          head_logits<H>(dl, hf, w, args.out_bias, c0, vocab, vpad, lane);
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int h = e >> 1, col = c0 + nt * 8 + 2 * t + (e & 1);
              const float prob = col == target[h] ? -st.others[h] / total[h] : __expf(dl[nt][e] - st.m[h]) / total[h];
              dl[nt][e] = col < vocab ? weight[h] * prob : 0.0f;
            }
          }
        }
#pragma unroll
        for (int np = 0; np < 4; ++np) {
          if (c0 + np * 16 >= vpad) continue;
          if constexpr (MODE == StepMode::kLogitsGrad) {  // loaded 16 columns at a time: fewer live registers
#pragma unroll
            for (int nt = 2 * np; nt < 2 * np + 2; ++nt) {
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                const int h = e >> 1, col = c0 + nt * 8 + 2 * t + (e & 1);
                dl[nt][e] = valid[h] && col < vocab ? args.dlogits_in[rows[h] * vocab + col] : 0.0f;
              }
            }
          }
          uint32_t a[4] = {pack_bf16(dl[2 * np][0], dl[2 * np][1]), pack_bf16(dl[2 * np][2], dl[2 * np][3]),
                           pack_bf16(dl[2 * np + 1][0], dl[2 * np + 1][1]),
                           pack_bf16(dl[2 * np + 1][2], dl[2 * np + 1][3])};
          mma_a_w<NT / 2>(dh, a, w, S, c0 + np * 16, lane);
          bf16* out = dz_s + (warp * 16 + g) * dzs + c0 + np * 16 + 2 * t;
          *reinterpret_cast<uint32_t*>(out) = a[0];
          *reinterpret_cast<uint32_t*>(out + 8 * dzs) = a[1];
          *reinterpret_cast<uint32_t*>(out + 8) = a[2];
          *reinterpret_cast<uint32_t*>(out + 8 * dzs + 8) = a[3];
#pragma unroll
          for (int i = 0; i < 2; ++i) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
              const int nt = 2 * np + half;
              const float sum = column_sum(dl[nt][i] + dl[nt][2 + i]);
              if (g == 0) atomicAdd(acc_out_b + c0 + nt * 8 + 2 * t + i, sum);
            }
          }
        }
      }
      // the residual stream's buffer now holds the gradient that flows to the latest residual source
      const float zeros[NT][4] = {};
      store_residual<H>(res, zeros, lane);
      __syncthreads();  // dlogits of every warp are in dz_s
      accumulate_weight_grad<H, false>(part + o_out_w, H, vocab, H, vpad, dz_s, dzs,
                                       act + static_cast<int64_t>(nh) * R * S, S, nullptr, R, warp, warps, lane);

      // ---- hidden layers' backward, j = nh .. 1
      for (int j = nh; j >= 1; --j) {
        w = begin_step();
        if (j > 1)
          prefetch_hidden(j - 2);
        else
          prefetch_in();
        if (j % p.residual_every == 0) {  // h_j = y_j + h_{j - every}: its gradient also flows to that source
          add_residual<H>(dh, res, lane);
          store_residual<H>(res, dh, lane);
        }
        if constexpr (kDyShared) store_residual<H>(dy_s, dh, lane);
        const bf16* input = act + static_cast<int64_t>(j - 1) * R * S;
        float z[NT][4] = {};
        mma_smem_a_wt<KC, NT / 2>(z, input, S, warp * 16, w, S, lane);
        layer_backward(z, dh, args.hidden_bias + (j - 1) * H, args.hidden_gain + (j - 1) * H,
                       acc_hid_b + (j - 1) * H, acc_hid_g + (j - 1) * H);
        uint32_t dzf[KC][4];
        to_fragments<KC>(dzf, z);
        store_fragments<KC>(dz_s, dzs, warp * 16, dzf, lane);
        __syncthreads();  // every warp's dz is in dz_s
        accumulate_weight_grad<H, false>(part + o_hid_w + static_cast<int64_t>(j - 1) * H * H, H, H, H, H, dz_s,
                                         dzs, input, S, nullptr, R, warp, warps, lane);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) dh[nt][0] = dh[nt][1] = dh[nt][2] = dh[nt][3] = 0.0f;
#pragma unroll
        for (int kc = 0; kc < KC; ++kc) mma_a_w<NT / 2>(dh, dzf[kc], w, S, kc * 16, lane);
      }

      // ---- input layer's backward (its output is always a residual source)
      w = begin_step();
      if (more_tiles) prefetch_in();
      add_residual<H>(dh, res, lane);
      if constexpr (kDyShared) store_residual<H>(dy_s, dh, lane);
      float z[NT][4] = {};
      mma_bits_wt<NT / 2>(z, x, bits, w, IN_STRIDE, lane);
      layer_backward(z, dh, args.in_bias, args.in_gain, acc_in_b, acc_in_g);
      uint32_t dzf[KC][4];
      to_fragments<KC>(dzf, z);
      store_fragments<KC>(dz_s, dzs, warp * 16, dzf, lane);
      __syncthreads();
      accumulate_weight_grad<kBitColumns, true>(part + o_in_w, bits, H, bits, H, dz_s, dzs, nullptr, 0, idx_s, R,
                                                warp, warps, lane);
    }
  }

  if constexpr (kBackward) {  // the bias and gain sums into this CTA's gradient row
    __syncthreads();
    const int64_t o_in_b = static_cast<int64_t>(H) * bits, o_hid_b = o_hid_w + static_cast<int64_t>(nh) * H * H;
    for (int i = threadIdx.x; i < 2 * H; i += blockDim.x) part[o_in_b + i] = acc[i];
    for (int i = threadIdx.x; i < 2 * nh * H; i += blockDim.x) part[o_hid_b + i] = acc[2 * H + i];
    const int64_t o_out_b = o_out_w + static_cast<int64_t>(vocab) * H;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) part[o_out_b + i] = acc_out_b[i];
  }
}

// ----------------------------------------------------------------------------- host side

using Kernel = void (*)(StepProblem, StepArgs);

template <int H>
Kernel kernel_for_mode(StepMode mode) {
  switch (mode) {
    case StepMode::kLogits: return fused_step_kernel<H, StepMode::kLogits>;
    case StepMode::kArgmax: return fused_step_kernel<H, StepMode::kArgmax>;
    case StepMode::kLoss: return fused_step_kernel<H, StepMode::kLoss>;
    case StepMode::kLossGrad: return fused_step_kernel<H, StepMode::kLossGrad>;
    case StepMode::kLogitsGrad: return fused_step_kernel<H, StepMode::kLogitsGrad>;
  }
  return nullptr;
}

Kernel kernel_for(int hidden, StepMode mode) {
  switch (hidden) {
    case 16: return kernel_for_mode<16>(mode);
    case 32: return kernel_for_mode<32>(mode);
    case 64: return kernel_for_mode<64>(mode);
    case 128: return kernel_for_mode<128>(mode);
    default: return nullptr;
  }
}

}  // namespace

bool step_supported(int hidden, int vocab) {
  return (hidden == 16 || hidden == 32 || hidden == 64 || hidden == 128) && vocab >= 1 && vocab <= 256;
}

const char* plan_step(const StepProblem& p, StepMode mode, int device, StepPlan* plan) {
  *plan = StepPlan{};
  const Kernel kernel = kernel_for(p.hidden, mode);
  if (kernel == nullptr || !step_supported(p.hidden, p.vocab)) return "unsupported hidden width or vocabulary";
  int smem_limit = 0, sms = 0;
  if (cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    return "querying the device failed";
  // The most warps (rows per CTA) whose shared memory fits: more rows share each weight load and gradient flush.
  for (int warps = kMaxWarps; warps >= 1; warps /= 2) {
    const Layout l = layout_of(p.hidden, p.hidden_layers, p.vocab, is_backward(mode), warps);
    if (l.total <= static_cast<size_t>(smem_limit)) {
      plan->warps = warps;
      plan->smem = l.total;
      break;
    }
  }
  if (plan->warps == 0) return "the model's layers do not fit one CTA's shared memory";
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(plan->smem)) !=
      cudaSuccess)
    return "raising the kernel's shared-memory limit failed";
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, 32 * plan->warps, plan->smem) != cudaSuccess ||
      per_sm < 1)
    return "the kernel cannot be resident on this device";
  const int64_t tiles = (p.n + 16 * plan->warps - 1) / (16 * plan->warps);
  const int64_t slots = static_cast<int64_t>(per_sm) * sms;
  plan->grid = static_cast<int>(tiles < slots ? tiles : slots);
  return nullptr;
}

cudaError_t launch_step(const StepProblem& p, StepMode mode, const StepPlan& plan, const StepArgs& args,
                        cudaStream_t stream) {
  const Kernel kernel = kernel_for(p.hidden, mode);
  if (kernel == nullptr) return cudaErrorInvalidValue;
  if (plan.grid > 0) kernel<<<plan.grid, 32 * plan.warps, plan.smem, stream>>>(p, args);
  return cudaGetLastError();
}

}  // namespace aunn_cuda
