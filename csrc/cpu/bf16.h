// bfloat16 operands for the products of the bf16 precision: float32 rounded to the nearest bfloat16 (ties to
// even, as aunn_fast.rounding.round_to_bf16), laid out in pairs along each product's k (Bf16Pair, tile.h).
//
// Weights are packed once per call with the scalar rounding (any CPU); a block's activations and gradients are
// converted per layer with AVX512-BF16's vcvtne(2)ps2bf16, which only exists where AUNN_HAS_BF16 is 1.
#pragma once

#include <cstdint>
#include <cstring>

#include "tile.h"

namespace aunn_cpu {

// The 16 bits of x rounded to the nearest bfloat16, ties to even; a NaN stays a (quiet) NaN.
inline uint32_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

// x rounded to the nearest bfloat16, as a float.
inline float bf16_round(float x) {
  const uint32_t u = bf16_bits(x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// dst[(k / 2) * ld + j] = the pair (element (k, j), element (k + 1, j)) rounded, for k < k_len (a zero after an
// odd last k) and j < m, element (k, j) at src[k * k_stride + j * j_stride].
inline void pack_pairs(const float* src, int64_t k_stride, int64_t j_stride, int64_t k_len, int64_t m,
                       Bf16Pair* dst, int64_t ld) {
  for (int64_t k = 0; k < k_len; k += 2)
    for (int64_t j = 0; j < m; ++j) {
      const uint32_t first = bf16_bits(src[k * k_stride + j * j_stride]);
      const uint32_t second = k + 1 < k_len ? bf16_bits(src[(k + 1) * k_stride + j * j_stride]) : 0u;
      dst[(k / 2) * ld + j] = first | (second << 16);
    }
}

#if AUNN_HAS_BF16
// rows x ld floats -> rows x ld bfloat16 (ld / 2 pairs a row, k along the row); ld a multiple of 16.
inline void to_bf16_rows(const float* src, int64_t rows, int64_t ld, Bf16Pair* dst) {
  uint16_t* out = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < rows * ld; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
}

// rows x ld floats -> ceil(rows / 2) x ld pairs of rows (k along the rows): dst[(r / 2) * ld + j] holds
// (src[r][j], src[r + 1][j]), with a zero row after an odd last row; ld a multiple of 16.
inline void pair_rows(const float* src, int64_t rows, int64_t ld, Bf16Pair* dst) {
  alignas(64) static const uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                        8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(kInterleave);
  for (int64_t r = 0; r < rows; r += 2)
    for (int64_t j = 0; j < ld; j += 16) {
      const __m512 first = _mm512_loadu_ps(src + r * ld + j);
      const __m512 second = r + 1 < rows ? _mm512_loadu_ps(src + (r + 1) * ld + j) : _mm512_setzero_ps();
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(second, first);  // first's 16, then second's 16
      _mm512_storeu_si512(dst + (r / 2) * ld + j, _mm512_permutexvar_epi16(interleave, both));
    }
}
#endif

}  // namespace aunn_cpu
