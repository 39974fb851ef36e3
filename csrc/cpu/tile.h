// Register-blocked products C = start + A[R x K] @ B[K x M] in float32 sums, on float32 operands or (AVX512-BF16)
// bfloat16 pairs: B and C row-major with leading dimensions, A at any two strides (element (r, k) at
// a[r * a_rs + k * a_ks]), so that A may be a transposed view; start is C itself or a bias row. Each tile's final
// sums go to a caller's finish while still in registers (the forward's SiLU and RMSNorm, mlp.cpp), or are stored.
// Also the vector exp, sigmoid and reciprocal those finishes use.
//
// Written with GCC/Clang vector extensions at the width the build targets (-march=native): 16 floats with
// AVX-512, 8 with AVX2, 4 otherwise. M must be a multiple of that width (callers pad every dimension).
// A tile of ROWS rows x NV vectors of C stays in registers over the whole K loop: one broadcast of A and
// NV loads of B feed ROWS x NV fused multiply-adds.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

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

// Lane-wise maximum and minimum of a limit and x that keep a NaN x (one instruction where the target has one).
inline VecF at_least(VecF limit, VecF x) {
#if defined(__AVX512F__)
  return (VecF)_mm512_max_ps((__m512)limit, (__m512)x);  // the second operand where either is a NaN
#elif defined(__AVX__)
  return (VecF)_mm256_max_ps((__m256)limit, (__m256)x);
#else
  return x < limit ? limit : x;
#endif
}
inline VecF at_most(VecF limit, VecF x) {
#if defined(__AVX512F__)
  return (VecF)_mm512_min_ps((__m512)limit, (__m512)x);
#elif defined(__AVX__)
  return (VecF)_mm256_min_ps((__m256)limit, (__m256)x);
#else
  return x > limit ? limit : x;
#endif
}

// exp(-z) per lane as its two factors, 2^n * p(r) with n = round(-z / log(2)) and r = -z - n log(2) (|r| <=
// log(2)/2), p a degree-5 polynomial fitted to exp on that range (relative error 9.2e-8 before rounding): within
// ~2 float32 ulps. z is clamped to [-88, 87], where 2^n stays a normal float (a sigmoid's exp(-z) beyond that range
// changes its result by under 1e-38). The rounding to n is fused into the multiplication by 1 / log(2): adding
// 1.5 * 2^23 + 127 leaves n + 127 in the sum's low bits, which shifted into the exponent field are 2^n's bits.
struct ExpOfNegative {
  VecF scale, poly;
  explicit ExpOfNegative(VecF z) {
    z = at_most(splat(87.0f), at_least(splat(-88.0f), z));
    const VecF shifted = z * splat(-1.44269504088896341f) + splat(12583039.0f);  // 1.5 * 2^23 + 127
    const VecF n = shifted - splat(12583039.0f);
    const VecF minus_r = (z + n * splat(0.693145751953125f)) + n * splat(1.42860682030941723e-06f);
    VecF p = splat(-0x1.0fa81ap-7f);  // the odd coefficients negated: p is evaluated at -r
    p = p * minus_r + splat(0x1.573a50p-5f);
    p = p * minus_r + splat(-0x1.555a6ap-3f);
    p = p * minus_r + splat(0x1.fffdc6p-2f);
    p = p * minus_r + splat(-0x1.fffff6p-1f);
    poly = p * minus_r + splat(1.0f);
    const VecI bits = reinterpret_cast<const VecI&>(shifted) << 23;
    scale = reinterpret_cast<const VecF&>(bits);
  }
  VecF value() const { return poly * scale; }
  VecF one_plus() const { return poly * scale + splat(1.0f); }  // 1 + exp(-z) in one fused multiply-add
};

// exp(x) per lane, within ~2 float32 ulps (ExpOfNegative).
inline VecF exp(VecF x) { return ExpOfNegative(-x).value(); }

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
inline VecF sigmoid(VecF z) { return reciprocal(ExpOfNegative(z).one_plus()); }

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

// The lane sums of four vectors in lanes 0-3, zeros in the others: the four transposed and added within each
// 128-bit lane, then the 128-bit lanes added (a dozen instructions where four sum_lanes take over thirty).
inline VecF sum_lanes_of_four(VecF a, VecF b, VecF c, VecF d) {
#if defined(__AVX512F__)
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps((__m512)a, (__m512)b), _mm512_unpackhi_ps((__m512)a, (__m512)b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps((__m512)c, (__m512)d), _mm512_unpackhi_ps((__m512)c, (__m512)d));
  const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(s),
                                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
  return (VecF)_mm512_zextps128_ps512(_mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1)));
#elif defined(__AVX__)
  const __m256 ab = _mm256_add_ps(_mm256_unpacklo_ps((__m256)a, (__m256)b), _mm256_unpackhi_ps((__m256)a, (__m256)b));
  const __m256 cd = _mm256_add_ps(_mm256_unpacklo_ps((__m256)c, (__m256)d), _mm256_unpackhi_ps((__m256)c, (__m256)d));
  const __m256 s = _mm256_add_ps(_mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
  return (VecF)_mm256_zextps128_ps256(_mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
#else
  VecF sums = splat(0.0f);
  sums[0] = sum_lanes(a);
  sums[1] = sum_lanes(b);
  sums[2] = sum_lanes(c);
  sums[3] = sum_lanes(d);
  return sums;
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

// A tile's accumulators: ROWS rows x NV vectors of C, in registers.
template <int ROWS, int NV>
using Accumulators = VecF[ROWS][NV];

// f(std::integral_constant<int, R>{}, row) for the row tiles of `rows` rows: kTileRows rows each and a last of fewer.
template <class F>
inline void for_row_tiles(int64_t rows, F&& f) {
  int64_t r = 0;
  for (; r + kTileRows <= rows; r += kTileRows) f(std::integral_constant<int, kTileRows>{}, r);
  switch (rows - r) {
    case 5: f(std::integral_constant<int, 5>{}, r); break;
    case 4: f(std::integral_constant<int, 4>{}, r); break;
    case 3: f(std::integral_constant<int, 3>{}, r); break;
    case 2: f(std::integral_constant<int, 2>{}, r); break;
    case 1: f(std::integral_constant<int, 1>{}, r); break;
    default: break;
  }
}

// f(std::integral_constant<int, NV>{}, column) for the column tiles of m columns (a multiple of kVectorFloats):
// kTileVectors vectors each, then single vectors.
template <class F>
inline void for_column_tiles(int64_t m, F&& f) {
  constexpr int64_t chunk = kTileVectors * kVectorFloats;
  int64_t j = 0;
  for (; j + chunk <= m; j += chunk) f(std::integral_constant<int, kTileVectors>{}, j);
  for (; j < m; j += kVectorFloats) f(std::integral_constant<int, 1>{}, j);
}

// finish(acc, ...) of acc = start + A @ B over k_len steps (k, or pairs of k) for one tile: start's rows start_rs
// floats apart (0: one row, a bias, for every row), A's element (r, k) at a[r * a_rs + k * a_ks], B's rows ldb apart.
template <class P, int ROWS, int NV, class Finish>
inline void tile(const typename P::Elem* a, int64_t a_rs, int64_t a_ks, const typename P::Elem* b, int64_t ldb,
                 const float* start, int64_t start_rs, int64_t k_len, Finish&& finish) {
  Accumulators<ROWS, NV> acc;
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = load(start + r * start_rs + v * kVectorFloats);
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
  finish(acc);
}

// The tile's accumulators stored into C (rows ldc apart).
template <int ROWS, int NV>
inline void store_tile(const Accumulators<ROWS, NV>& acc, float* c, int64_t ldc) {
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) store(c + r * ldc + v * kVectorFloats, acc[r][v]);
}

// Steps of k a tile takes at a time: a kBlockK x (kTileVectors vectors) panel of B stays in L1 while every row
// tile of A passes over it (wide layers: a 512 x 512 weight is 1 MB, out of L1 and L2).
constexpr int64_t kBlockK = 128;

// C = start + A[rows x k_len] @ B[k_len x m] (k_len steps of P: k, or pairs of k), each tile's final sums handed to
// finish(acc, row, column) in registers (earlier k blocks go through C, rows ldc floats apart): start is `bias`
// (one row of m floats, for every row) or, where bias is null, C's own values. A's element (r, k) at
// a[r * a_rs + k * a_ks], B's (k, j) at b[k * ldb + j]; m a multiple of kVectorFloats. Tiles finish in order of
// their columns for each row.
template <class P, class Finish>
inline void matmul_finish(const typename P::Elem* a, int64_t a_rs, int64_t a_ks, const typename P::Elem* b,
                          int64_t ldb, const float* bias, float* c, int64_t ldc, int64_t rows, int64_t k_len, int64_t m,
                          Finish&& finish) {
  for_column_tiles(m, [&](auto nv, int64_t j) {
    for (int64_t k = 0; k < k_len; k += kBlockK) {
      const int64_t k_block = std::min(kBlockK, k_len - k);
      const bool last = k + k_block >= k_len;
      const typename P::Elem* bk = b + k * ldb + j;
      for_row_tiles(rows, [&](auto row_count, int64_t r) {
        constexpr int ROWS = decltype(row_count)::value, NV = decltype(nv)::value;
        const bool from_bias = k == 0 && bias != nullptr;
        const float* start = from_bias ? bias + j : c + r * ldc + j;
        tile<P, ROWS, NV>(a + r * a_rs + k * a_ks, a_rs, a_ks, bk, ldb, start, from_bias ? 0 : ldc, k_block,
                          [&](Accumulators<ROWS, NV>& acc) {
                            if (last) {
                              finish(acc, r, j);
                            } else {
                              store_tile(acc, c + r * ldc + j, ldc);
                            }
                          });
      });
    }
  });
}

// C[rows x m] += A[rows x k_len] @ B[k_len x m] (float32 C; arguments as matmul_finish's).
template <class P = Fp32Product>
inline void matmul_add(const typename P::Elem* a, int64_t a_rs, int64_t a_ks, const typename P::Elem* b,
                       int64_t ldb, float* c, int64_t ldc, int64_t rows, int64_t k_len, int64_t m) {
  matmul_finish<P>(a, a_rs, a_ks, b, ldb, nullptr, c, ldc, rows, k_len, m, [&](auto& acc, int64_t r, int64_t j) {
    store_tile(acc, c + r * ldc + j, ldc);
  });
}

}  // namespace aunn_cpu
