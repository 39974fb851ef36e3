// Register-blocked product C[R x M] += A[R x K] @ B[K x M] into float32 C, on float32 operands or (AVX512-BF16)
// bfloat16 pairs: B and C row-major with leading dimensions, A at any two strides (element (r, k) at
// a[r * a_rs + k * a_ks]), so that A may be a transposed view.
//
// Written with GCC/Clang vector extensions at the width the build targets (-march=native): 16 floats with
// AVX-512, 8 with AVX2, 4 otherwise. M must be a multiple of that width (callers pad every dimension).
// A tile of ROWS rows x NV vectors of C stays in registers over the whole K loop: one broadcast of A and
// NV loads of B feed ROWS x NV fused multiply-adds.
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace aunn_cpu {

#if defined(__AVX512F__)
#define AUNN_VECTOR_FLOATS 16
constexpr int kTileRows = 6;
constexpr int kTileVectors = 4;  // 24 accumulators + 4 loads + 1 broadcast of 32 zmm registers
#elif defined(__AVX__)
#define AUNN_VECTOR_FLOATS 8
constexpr int kTileRows = 6;
constexpr int kTileVectors = 2;  // 12 accumulators + 2 loads + 1 broadcast of 16 ymm registers
#else
#define AUNN_VECTOR_FLOATS 4
constexpr int kTileRows = 6;
constexpr int kTileVectors = 2;
#endif

constexpr int kVectorFloats = AUNN_VECTOR_FLOATS;
// aligned(4): loads and stores through this type may be unaligned
typedef float VecF __attribute__((vector_size(AUNN_VECTOR_FLOATS * 4), aligned(4)));

inline VecF load(const float* p) { return *reinterpret_cast<const VecF*>(p); }
inline void store(float* p, VecF v) { *reinterpret_cast<VecF*>(p) = v; }

typedef int32_t VecI __attribute__((vector_size(AUNN_VECTOR_FLOATS * 4)));

inline VecF splat(float x) { return VecF{} + x; }

// exp(x) per lane, within ~2 float32 ulps: 2^n * p(r) with r = x - n log(2), |r| <= log(2)/2, p the degree-7
// Taylor polynomial; x is clamped to [-87, 88], where the result stays a normal float (a sigmoid's exp(-z)
// beyond that range changes its result by under 1e-38).
inline VecF exp(VecF x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  x = x > splat(88.0f) ? splat(88.0f) : x;
#if defined(__AVX512F__)
  const VecF n = (VecF)_mm512_roundscale_ps((__m512)(x * splat(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
#else
  const VecF magic = splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const VecF n = (x * splat(1.44269504088896341f) + magic) - magic;
#endif
  const VecF r = (x - n * splat(0.693145751953125f)) - n * splat(1.42860682030941723e-06f);
  VecF p = splat(1.0f / 5040.0f);
  p = p * r + splat(1.0f / 720.0f);
  p = p * r + splat(1.0f / 120.0f);
  p = p * r + splat(1.0f / 24.0f);
  p = p * r + splat(1.0f / 6.0f);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.0f);
  p = p * r + splat(1.0f);
#if defined(__AVX512F__)
  return (VecF)_mm512_scalef_ps((__m512)p, (__m512)n);  // p * 2^n in one instruction
#else
  const VecI scale_bits = (__builtin_convertvector(n, VecI) + 127) << 23;
  return p * reinterpret_cast<const VecF&>(scale_bits);
#endif
}

// 1 / d per lane for d >= 1. AVX-512: the 14-bit estimate and one Newton step (within ~1 ulp), a few cycles
// where a division of 16 floats holds the divider for ~16; elsewhere the division (cheap at 8 lanes).
inline VecF reciprocal(VecF d) {
#if defined(__AVX512F__)
  const VecF r = (VecF)_mm512_rcp14_ps((__m512)d);
  return r + r * (splat(1.0f) - d * r);
#else
  return splat(1.0f) / d;
#endif
}

// sigmoid(z) = 1 / (1 + exp(-z)) per lane.
inline VecF sigmoid(VecF z) { return reciprocal(splat(1.0f) + exp(-z)); }

// The sum of the lanes, as a tree of shuffles and adds (a row's reduction runs once per row and layer).
inline float sum_lanes(VecF v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#elif defined(__AVX__)
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
  const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)));
#else
  float total = 0.0f;
  for (int i = 0; i < kVectorFloats; ++i) total += v[i];
  return total;
#endif
}

inline int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// What a product's inner step does, per operand type. Fp32Product: float32 operands, one k per step, an FMA
// of a broadcast A element with a vector of B. Bf16Product (CPUs with AVX512-BF16): bfloat16 operands in pairs
// along k (Bf16Pair), two k per step, vdpbf16ps adding both products into float32 sums.
typedef uint32_t Bf16Pair;  // two bfloat16 values, the pair's first k in the low half

struct Fp32Product {
  using Elem = float;
  using BVec = VecF;
  static BVec load_b(const float* p) { return load(p); }
  static VecF step(VecF acc, float a, BVec b) { return acc + a * b; }
};

#if defined(__AVX512BF16__)
#define AUNN_HAS_BF16 1
struct Bf16Product {
  using Elem = Bf16Pair;
  using BVec = __m512bh;
  static BVec load_b(const Bf16Pair* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static VecF step(VecF acc, Bf16Pair a, BVec b) {
    return (VecF)_mm512_dpbf16_ps((__m512)acc, (__m512bh)_mm512_set1_epi32(static_cast<int>(a)), b);
  }
};
#else
#define AUNN_HAS_BF16 0
#endif

// C[ROWS x NV vectors] += A @ B over k_len steps (k, or pairs of k), with the accumulators in registers.
template <class P, int ROWS, int NV>
inline void tile(const typename P::Elem* a, int64_t a_rs, int64_t a_ks, const typename P::Elem* b, int64_t ldb,
                 float* c, int64_t ldc, int64_t k_len) {
  VecF acc[ROWS][NV];
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = load(c + r * ldc + v * kVectorFloats);
  for (int64_t k = 0; k < k_len; ++k) {
    typename P::BVec bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = P::load_b(b + k * ldb + v * kVectorFloats);
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      const typename P::Elem av = a[r * a_rs + k * a_ks];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = P::step(acc[r][v], av, bv[v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) store(c + r * ldc + v * kVectorFloats, acc[r][v]);
}

// C[rows x NV vectors] += A[rows x k_len] @ B[k_len x NV vectors], in tiles of kTileRows rows and a last one.
template <class P, int NV>
inline void panel(const typename P::Elem* a, int64_t a_rs, int64_t a_ks, const typename P::Elem* b, int64_t ldb,
                  float* c, int64_t ldc, int64_t rows, int64_t k_len) {
  int64_t r = 0;
  for (; r + kTileRows <= rows; r += kTileRows)
    tile<P, kTileRows, NV>(a + r * a_rs, a_rs, a_ks, b, ldb, c + r * ldc, ldc, k_len);
  a += r * a_rs;
  c += r * ldc;
  switch (rows - r) {
    case 5: tile<P, 5, NV>(a, a_rs, a_ks, b, ldb, c, ldc, k_len); break;
    case 4: tile<P, 4, NV>(a, a_rs, a_ks, b, ldb, c, ldc, k_len); break;
    case 3: tile<P, 3, NV>(a, a_rs, a_ks, b, ldb, c, ldc, k_len); break;
    case 2: tile<P, 2, NV>(a, a_rs, a_ks, b, ldb, c, ldc, k_len); break;
    case 1: tile<P, 1, NV>(a, a_rs, a_ks, b, ldb, c, ldc, k_len); break;
    default: break;
  }
}

// Steps of k a panel takes at a time: a kBlockK x (kTileVectors vectors) panel of B stays in L1 while every row
// tile of A passes over it (wide layers: a 512 x 512 weight is 1 MB, out of L1 and L2).
constexpr int64_t kBlockK = 128;

// C[rows x m] += A[rows x k_len] @ B[k_len x m] (float32 C; k_len steps of P: k, or pairs of k), A's element
// (r, k) at a[r * a_rs + k * a_ks], B's (k, j) at b[k * ldb + j]; m a multiple of kVectorFloats.
template <class P = Fp32Product>
inline void matmul_add(const typename P::Elem* a, int64_t a_rs, int64_t a_ks, const typename P::Elem* b,
                       int64_t ldb, float* c, int64_t ldc, int64_t rows, int64_t k_len, int64_t m) {
  constexpr int64_t chunk = kTileVectors * kVectorFloats;
  for (int64_t j = 0; j < m; j += chunk) {
    for (int64_t k = 0; k < k_len; k += kBlockK) {
      const int64_t k_block = std::min(kBlockK, k_len - k);
      const typename P::Elem* ak = a + k * a_ks;
      const typename P::Elem* bk = b + k * ldb + j;
      if (j + chunk <= m) {
        panel<P, kTileVectors>(ak, a_rs, a_ks, bk, ldb, c + j, ldc, rows, k_block);
      } else {
        for (int64_t v = 0; j + v < m; v += kVectorFloats)
          panel<P, 1>(ak, a_rs, a_ks, bk + v, ldb, c + j + v, ldc, rows, k_block);
      }
    }
  }
}

// out[0 : NV vectors] = base + the sum of the rows `bit` of `rows` (ld floats apart) for every set bit.
template <int NV>
inline void sum_rows_of_bits(const float* base, const float* rows, int64_t ld, uint64_t bits, float* out) {
  VecF acc[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) acc[v] = load(base + v * kVectorFloats);
  for (; bits != 0; bits &= bits - 1) {
    const float* row = rows + __builtin_ctzll(bits) * ld;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[v] += load(row + v * kVectorFloats);
  }
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) store(out + v * kVectorFloats, acc[v]);
}

}  // namespace aunn_cpu
