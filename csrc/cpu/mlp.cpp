// The fused CPU AUNN (see mlp.h). One block of rows goes through every layer while its activations stay in
// cache: the input layer as the sum of the weight rows of the index's set bits, the hidden products and the
// head through tile.h's register-blocked product, the loss without writing logits out, and, for a backward,
// every layer's gradients from the block's stored activations. Each thread packs the weights itself and claims
// chunks of blocks until none is left, summing each chunk's weight gradients in the chunk's own buffer; each
// thread's share of chunks is added up, then the threads add the shares up by parameter rows (sum_gradient_rows).
// Each thread keeps its block buffers and (up to kKeptPackBytes) its pack across calls, the calling thread the
// chunks' buffers.
#include "mlp.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <utility>

#include "bf16.h"
#include "tile.h"

namespace aunn_cpu {
namespace {

// The weights padded and laid out for the products. float32: forward operands transposed ([in][out]),
// backward operands as stored ([out][in]). bf16: the same products' operands rounded, in pairs along k.
struct Packed {
  Shape shape{};
  int64_t hp = 0, vp = 0;         // hidden and vocab padded to the vector width
  std::vector<float> in_wt;       // [B][Hp] (rounded in bf16: the input layer sums weight rows exactly)
  // The input layer's sums for every value of each 4-bit group of an index: [ceil(B/4)][16][Hp], entry (g, v) the
  // sum of in_wt's rows 4g + b for v's set bits b; empty where the input layer adds rows bit by bit.
  std::vector<float> group_sums;
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
  // Packs p, reusing this pack's buffers (each thread keeps one: the parameters change between calls); with
  // group_sums, also the input layer's group_sums.
  void pack(const Params& p, const Shape& s, bool for_backward, bool with_group_sums);
  int64_t bytes() const {
    int64_t total = 0;
    for (const auto* v : {&in_wt, &group_sums, &in_b, &in_g, &hb, &hg, &ob, &wt, &out_wt, &w_copy, &out_w_copy})
      total += static_cast<int64_t>(v->capacity() * sizeof(float));
    for (const auto* v : {&wt16, &out_wt16, &w16, &out_w16})
      total += static_cast<int64_t>(v->capacity() * sizeof(Bf16Pair));
    return total;
  }
};

// The gradients in the packed layout: in_weight transposed, everything padded.
struct GradLayout {
  int64_t in_wt, in_b, in_g, w, hb, hg, out_w, ob, size;  // offsets into one buffer, and its size
  explicit GradLayout(const Shape& s);
};



// Rows per block: eight 6-row tiles. The block's activations stay in L2 up to H = 128; wider layers keep
// 48 rows too, as fewer would read each layer's weights (and write its weight gradient) more often per row.
constexpr int64_t kBlockRows = 48;
// Fewer rows than 2 x kBlockRows are split evenly over the threads, in blocks of at least this many rows (an even
// number: bf16 pairs rows): a 64-row prompt runs as two 32-row blocks, one per core, not 48 on one and 16 on the
// other; smaller ones stay in one block, where a second thread's start and reduction would cost more.
constexpr int64_t kMinSplitRows = 16;

int64_t block_rows(int64_t n) {
  const int64_t threads = at::get_num_threads();
  const int64_t even_share = round_up((n + threads - 1) / threads, 2);
  return std::min(kBlockRows, std::max(kMinSplitRows, even_share));
}

void pad_rows(const float* src, int64_t rows, int64_t cols, float* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * ld, src + r * cols, cols * sizeof(float));
}

#if defined(__AVX512F__)
constexpr int64_t kTransposeBlock = 16;
// The 16 x 16 floats at s (rows s_ld apart) transposed into d (rows d_ld apart), in registers: 4 x 4 blocks within
// each 128-bit lane, then the lanes.
inline void transpose_block(const float* s, int64_t s_ld, float* d, int64_t d_ld) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(s + i * s_ld);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // r[i + m], lane j: column 4j + m of rows i .. i + 3
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int m = 0; m < 4; ++m) {
    t[m] = _mm512_shuffle_f32x4(r[m], r[m + 4], 0x88);  // lanes 0, 2 of each
    t[m + 4] = _mm512_shuffle_f32x4(r[m], r[m + 4], 0xdd);  // lanes 1, 3
    t[m + 8] = _mm512_shuffle_f32x4(r[m + 8], r[m + 12], 0x88);
    t[m + 12] = _mm512_shuffle_f32x4(r[m + 8], r[m + 12], 0xdd);
  }
  for (int m = 0; m < 4; ++m) {
    _mm512_storeu_ps(d + m * d_ld, _mm512_shuffle_f32x4(t[m], t[m + 8], 0x88));
    _mm512_storeu_ps(d + (m + 8) * d_ld, _mm512_shuffle_f32x4(t[m], t[m + 8], 0xdd));
    _mm512_storeu_ps(d + (m + 4) * d_ld, _mm512_shuffle_f32x4(t[m + 4], t[m + 12], 0x88));
    _mm512_storeu_ps(d + (m + 12) * d_ld, _mm512_shuffle_f32x4(t[m + 4], t[m + 12], 0xdd));
  }
}
#elif defined(__AVX__)
constexpr int64_t kTransposeBlock = 8;
// The 8 x 8 floats at s (rows s_ld apart) transposed into d (rows d_ld apart), in registers.
inline void transpose_block(const float* s, int64_t s_ld, float* d, int64_t d_ld) {
  __m256 row[8], pair[8], quad[8];
  for (int i = 0; i < 8; ++i) row[i] = _mm256_loadu_ps(s + i * s_ld);
  for (int i = 0; i < 8; i += 2) {
    pair[i] = _mm256_unpacklo_ps(row[i], row[i + 1]);
    pair[i + 1] = _mm256_unpackhi_ps(row[i], row[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    quad[i] = _mm256_shuffle_ps(pair[i], pair[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    quad[i + 1] = _mm256_shuffle_ps(pair[i], pair[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    quad[i + 2] = _mm256_shuffle_ps(pair[i + 1], pair[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    quad[i + 3] = _mm256_shuffle_ps(pair[i + 1], pair[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(d + i * d_ld, _mm256_permute2f128_ps(quad[i], quad[i + 4], 0x20));
    _mm256_storeu_ps(d + (i + 4) * d_ld, _mm256_permute2f128_ps(quad[i], quad[i + 4], 0x31));
  }
}
#endif

// dst[c * ld + r] = src[r * src_ld + c] for the rows x cols top-left of src (square blocks in registers where the
// build has AVX: a prompt's step packs the weights every call).
void transpose_into(const float* src, int64_t rows, int64_t cols, int64_t src_ld, float* dst, int64_t ld) {
  int64_t r0 = 0, c0 = 0;
#if defined(__AVX__)
  constexpr int64_t kB = kTransposeBlock;
  for (; r0 + kB <= rows; r0 += kB)
    for (int64_t c = 0; c + kB <= cols; c += kB) transpose_block(src + r0 * src_ld + c, src_ld, dst + c * ld + r0, ld);
  c0 = cols / kB * kB;
#endif
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = r < r0 ? c0 : 0; c < cols; ++c) dst[c * ld + r] = src[r * src_ld + c];
}

// Per-block buffers of one thread, kept across calls (thread_workspace): a call only grows them, so a prompt's
// step allocates and zeroes nothing. Every buffer is written before it is read.
struct Workspace {
  int64_t rows = 0, hp = 0, vp = 0, layers = 0;  // layers: the input layer and the hidden ones
  bool keeps_activations = false;                 // z and sig for a backward (a forward alone needs only h)
  std::vector<float> z, sig, h, rstd, logits, dh, dz, pending;
  std::vector<float> row_sums;    // [rows][kVectorFloats]: partial sums of squares of a row's SiLU (Activation)
  std::vector<float> zero_row;    // [hp] zeros (input_tile); never written
  std::vector<float> coef;        // backward: each row's norm term (norm_backward)
  std::vector<float> index_bits;  // backward: the block's index bits as 0/1 floats, [rows][64]
  std::vector<Bf16Pair> rows16, pairs_a, pairs_b;  // bf16: one product's operands (bf16.h's layouts)
  void prepare(const Packed& p, int64_t rows_, bool backward) {
    rows = rows_;
    hp = p.hp;
    vp = p.vp;
    layers = p.shape.hidden_layers + 1;
    keeps_activations = backward;
    for (auto* v : {&z, &sig, &h}) grow(*v, layers * rows * hp);
    grow(rstd, layers * rows);
    grow(logits, rows * vp);
    grow(row_sums, rows * kVectorFloats);
    grow(zero_row, hp);
    if (backward) {
      for (auto* v : {&dh, &dz, &pending}) grow(*v, rows * hp);
      grow(coef, rows);
      grow(index_bits, rows * 64);
    }
    if (p.shape.bf16) {
      const int64_t width = std::max(hp, vp);
      grow(rows16, rows * width / 2);
      if (backward) {
        grow(pairs_a, (rows + 1) / 2 * width);
        grow(pairs_b, (rows + 1) / 2 * width);
      }
    }
  }
  float* z_of(int64_t layer) { return z.data() + layer * rows * hp; }
  float* sig_of(int64_t layer) { return sig.data() + layer * rows * hp; }
  float* h_of(int64_t layer) { return h.data() + layer * rows * hp; }
  float* rstd_of(int64_t layer) { return rstd.data() + layer * rows; }

 private:
  template <class T>
  static void grow(std::vector<T>& v, int64_t size) {
    if (static_cast<int64_t>(v.size()) < size) v.resize(size);
  }
};

// This thread's workspace (torch's intra-op threads live as long as the process).
Workspace& thread_workspace() {
  thread_local Workspace w;
  return w;
}

// base + i, or null where the precision has no such operand (base null).
template <class T>
const T* offset_or_null(const T* base, int64_t i) {
  return base == nullptr ? nullptr : base + i;
}

bool adds_residual(const Shape& s, int64_t hidden_layer) { return (hidden_layer + 1) % s.residual_every == 0; }

uint64_t bit_mask(int64_t bits) { return bits >= 64 ? ~uint64_t{0} : (uint64_t{1} << bits) - 1; }

// A layer's h = RMSNorm(SiLU(z)) * gain (+ res) as the finish of the tiles that sum its z (matmul_finish, tile.h):
// SiLU and the rows' sums of squares while the tile is in registers. Tiles before a row's last store SiLU(z) into h
// and their partial sums of squares into row_sums; the last one normalises the whole row. Keeps sigmoid(z), z and
// 1/rms for a backward (z and sig null: predictions need only h).
struct Activation {
  int64_t hp;
  float inv_h, eps;
  const float* gain;
  const float* res;  // the residual added to h, or null
  float *z, *sig, *h, *rstd, *row_sums;

  template <int ROWS, int NV>
  void operator()(Accumulators<ROWS, NV>& acc, int64_t row, int64_t col) const {
    VecF sum_sq[ROWS];
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      sum_sq[r] = col == 0 ? splat(0.0f) : load(row_sums + (row + r) * kVectorFloats);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        const int64_t at = (row + r) * hp + col + v * kVectorFloats;
        const VecF zv = acc[r][v], s = sigmoid(zv);
        if (z != nullptr) {
          store(z + at, zv);
          store(sig + at, s);
        }
        acc[r][v] = zv * s;  // SiLU(z)
        sum_sq[r] += acc[r][v] * acc[r][v];
      }
    }
    if (col + NV * kVectorFloats < hp) {
#pragma GCC unroll 8
      for (int r = 0; r < ROWS; ++r) {
        store(row_sums + (row + r) * kVectorFloats, sum_sq[r]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) store(h + (row + r) * hp + col + v * kVectorFloats, acc[r][v]);
      }
      return;
    }
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      const float inv_rms = 1.0f / std::sqrt(sum_lanes(sum_sq[r]) * inv_h + eps);
      rstd[row + r] = inv_rms;
      float* hr = h + (row + r) * hp;
      for (int64_t c = 0; c < col; c += kVectorFloats) store(hr + c, normalised(load(hr + c), inv_rms, row + r, c));
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        const int64_t c = col + v * kVectorFloats;
        store(hr + c, normalised(acc[r][v], inv_rms, row + r, c));
      }
    }
  }

  VecF normalised(VecF silu, float inv_rms, int64_t r, int64_t c) const {
    const VecF y = silu * inv_rms * load(gain + c);
    return res == nullptr ? y : y + load(res + r * hp + c);
  }
};

// The finish of `layer` (0: the input layer) into h and w's other buffers.
Activation activation(const Packed& p, const float* gain, const float* res, int64_t layer, float* h, Workspace& w) {
  Activation act{p.hp, 1.0f / static_cast<float>(p.shape.hidden), p.shape.eps, gain, res, nullptr, nullptr,
                 h, w.rstd_of(layer), w.row_sums.data()};
  if (w.keeps_activations) {
    act.z = w.z_of(layer);
    act.sig = w.sig_of(layer);
  }
  return act;
}

// Where `layer`'s h goes: its own buffer where a backward reads every layer's, else the first buffer that is
// neither the layer's input nor the residual (a forward alone cycles through at most three, kept in L1).
float* h_out(Workspace& w, int64_t layer, const float* in, const float* res) {
  if (w.keeps_activations) return w.h_of(layer);
  int64_t i = 0;
  while (w.h_of(i) == in || w.h_of(i) == res) ++i;
  return w.h_of(i);
}

// Bits of an index per group of the input layer's group_sums, and entries per group.
constexpr int kGroupBits = 4;
constexpr int64_t kGroupValues = int64_t{1} << kGroupBits;

// The groups of an index's `bits` low bits (the last one partial where bits is not a multiple of kGroupBits).
constexpr int64_t index_groups(int64_t bits) { return (bits + kGroupBits - 1) / kGroupBits; }

// The input layer's tile: bias + the sum of the weight rows of each row's set bits (in_wt's rows hp floats apart),
// in registers, then finished by act. With group_sums, one precomputed sum per 4-bit group of the index: 16
// independent loads and adds a row for 64 bits, no branch on the values. Without them (a few rows, where building
// the sums would cost more), the rows step through their bits together, a row whose bits have run out adding
// zeros: 4 x ROWS independent chains of additions and one loop exit per tile, where a loop per row would wait on
// one chain's latency and mispredict every row's exit.
template <int ROWS, int NV>
void input_tile(const Packed& p, const int64_t* idx, uint64_t mask, const float* zeros, int64_t row, int64_t col,
                const Activation& act) {
  Accumulators<ROWS, NV> acc;
  uint64_t bits[ROWS];
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r) {
    bits[r] = static_cast<uint64_t>(idx[row + r]) & mask;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = load(p.in_b.data() + col + v * kVectorFloats);
  }
  if (!p.group_sums.empty()) {
    const int64_t groups = index_groups(p.shape.bits);
    for (int64_t g = 0; g < groups; ++g) {
      const float* sums = p.group_sums.data() + g * kGroupValues * p.hp + col;
#pragma GCC unroll 8
      for (int r = 0; r < ROWS; ++r) {
        const float* sum = sums + static_cast<int64_t>((bits[r] >> (g * kGroupBits)) & (kGroupValues - 1)) * p.hp;
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[r][v] += load(sum + v * kVectorFloats);
      }
    }
    act(acc, row, col);
    return;
  }
  int steps = 0;
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r) steps = std::max(steps, __builtin_popcountll(bits[r]));
  for (int step = 0; step < steps; ++step) {
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      const float* weights = bits[r] == 0 ? zeros : p.in_wt.data() + __builtin_ctzll(bits[r]) * p.hp + col;
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] += load(weights + v * kVectorFloats);
      bits[r] &= bits[r] - 1;
    }
  }
  act(acc, row, col);
}

// C = bias + X @ B (bias null: C += X @ B), finished by finish(acc, row, col): X the block's float32 rows
// [nb][x_ld], B a packed weight's first k_len rows (b32 in float32, b16 in bf16 pairs, m columns); C's rows m
// floats apart.
template <class Finish>
void rows_times_finish(const Packed& p, const float* x, int64_t x_ld, int64_t nb, const float* b32,
                       const Bf16Pair* b16, int64_t k_len, const float* bias, float* c, int64_t m, Workspace& w,
                       Finish&& finish) {
#if AUNN_HAS_BF16
  if (p.shape.bf16) {
    to_bf16_rows(x, nb, x_ld, w.rows16.data());
    matmul_finish<Bf16Product>(w.rows16.data(), x_ld / 2, 1, b16, m, bias, c, m, nb, (k_len + 1) / 2, m, finish);
    return;
  }
#endif
  matmul_finish<Fp32Product>(x, x_ld, 1, b32, m, bias, c, m, nb, k_len, m, finish);
}

// C[nb x m] += X @ B (arguments as rows_times_finish's).
void rows_times(const Packed& p, const float* x, int64_t x_ld, int64_t nb, const float* b32, const Bf16Pair* b16,
                int64_t k_len, float* c, int64_t m, Workspace& w) {
  rows_times_finish(p, x, x_ld, nb, b32, b16, k_len, nullptr, c, m, w,
                    [&](auto& acc, int64_t r, int64_t j) { store_tile(acc, c + r * m + j, m); });
}

// C[y_cols x x_ld] += Y^T @ X over the block's nb rows (a weight gradient): Y [nb][y_ld], X [nb][x_ld].
void transposed_times(const Packed& p, const float* y, int64_t y_ld, int64_t y_cols, const float* x, int64_t x_ld,
                      int64_t nb, float* c, Workspace& w) {
#if AUNN_HAS_BF16
  if (p.shape.bf16) {
    pair_rows(y, nb, y_ld, w.pairs_a.data());
    pair_rows(x, nb, x_ld, w.pairs_b.data());
    matmul_add<Bf16Product>(w.pairs_a.data(), 1, y_ld, w.pairs_b.data(), x_ld, c, x_ld, y_cols, (nb + 1) / 2, x_ld);
    return;
  }
#endif
  matmul_add(y, 1, y_ld, x, x_ld, c, x_ld, y_cols, nb, x_ld);
}

// Vocabularies up to this size (one vector of logits a row) take the fp32 head as dot products (head_as_dots).
constexpr int64_t kDotHeadVocab = 4;

// logits = h @ out_w^T + bias for vocab <= kDotHeadVocab (fp32): each row's dot products with the vocab's weight
// rows, 4 x Hp / kVectorFloats multiply-adds and one sum_lanes_of_four a row where the product's tile takes Hp
// (its columns padded from the vocab to a whole vector). Writes each row's first vector of logits, padding zeros.
void head_as_dots(const Packed& p, const float* h, int64_t nb, float* logits) {
  const int64_t hp = p.hp, v = p.shape.vocab;
  const VecF bias = load(p.ob.data());
  for (int64_t r = 0; r < nb; ++r) {
    VecF acc[kDotHeadVocab] = {};
    for (int64_t c = 0; c < hp; c += kVectorFloats) {
      const VecF x = load(h + r * hp + c);
#pragma GCC unroll 4
      for (int64_t t = 0; t < kDotHeadVocab; ++t)
        if (t < v) acc[t] += x * load(p.out_w + t * hp + c);
    }
    store(logits + r * p.vp, bias + sum_lanes_of_four(acc[0], acc[1], acc[2], acc[3]));
  }
}

void forward_block(const Packed& p, const int64_t* idx, int64_t nb, Workspace& w) {
  const Shape& s = p.shape;
  const int64_t hp = p.hp;
  const uint64_t mask = bit_mask(s.bits);
  const Activation input = activation(p, p.in_g.data(), nullptr, 0, w.h_of(0), w);
  for_column_tiles(hp, [&](auto nv, int64_t col) {
    for_row_tiles(nb, [&](auto rows, int64_t row) {
      input_tile<decltype(rows)::value, decltype(nv)::value>(p, idx, mask, w.zero_row.data(), row, col, input);
    });
  });
  const float* in = w.h_of(0);
  const float* res = in;
  for (int64_t l = 0; l < s.hidden_layers; ++l) {
    const bool residual = adds_residual(s, l);
    float* out = h_out(w, l + 1, in, res);
    rows_times_finish(p, in, hp, nb, offset_or_null(p.wt.data(), l * hp * hp),
                      offset_or_null(p.wt16.data(), l * hp / 2 * hp), s.hidden, p.hb.data() + l * hp, out, hp, w,
                      activation(p, p.hg.data() + l * hp, residual ? res : nullptr, l + 1, out, w));
    if (residual) res = out;
    in = out;
  }
  if (!s.bf16 && s.vocab <= kDotHeadVocab) {
    head_as_dots(p, in, nb, w.logits.data());
    return;
  }
  float* logits = w.logits.data();
  rows_times_finish(p, in, hp, nb, p.out_wt.data(), p.out_wt16.data(), s.hidden, p.ob.data(), logits, p.vp, w,
                    [&](auto& acc, int64_t r, int64_t j) { store_tile(acc, logits + r * p.vp + j, p.vp); });
}

// log(sum(exp(row))) over the first v entries, kept as max + log1p(the other entries' share) and never summed
// into one float: row[i] - lse is then (row[i] - max) - log_rest, and a confident row's loss and its target's
// gradient (p - 1) keep their digits instead of losing them to a rounding of lse (~2.4e-7 at lse ~ 2).
struct LogSumExp {
  float max, log_rest;
  float minus(float x) const { return (x - max) - log_rest; }  // x - lse
};

// The row's first v entries of a row padded to whole vectors (tile.h's exp, a vector at a time: at vocab 4, one
// call where std::exp took four).
LogSumExp log_sum_exp(const float* row, int64_t v) {
  int64_t top = 0;
  for (int64_t i = 1; i < v; ++i)
    if (row[i] > row[top]) top = i;
  VecI lane;
  for (int i = 0; i < kVectorFloats; ++i) lane[i] = i;
  VecF rest = splat(0.0f);
  for (int64_t c = 0; c < v; c += kVectorFloats, lane += kVectorFloats) {
    const VecF e = exp(load(row + c) - row[top]);
    rest += (lane < static_cast<int32_t>(v) && lane != static_cast<int32_t>(top)) ? e : splat(0.0f);
  }
  return {row[top], std::log1p(sum_lanes(rest))};
}

// torch.argmax's choice: the first maximum, a NaN counting as the largest value.
// Without branches on the values (a conditional move each step): random rows' comparisons are unpredictable.
int64_t arg_max(const float* row, int64_t v) {
  int64_t best = 0;
  float top = row[0];
  for (int64_t i = 1; i < v; ++i) {
    const float x = row[i];
    const bool take = (x > top) | ((x != x) & (top == top));  // a NaN beats any number, not an earlier NaN
    best = take ? i : best;
    top = take ? x : top;
  }
  return best;
}

void write_outputs(const Packed& p, const Job& job, int64_t r0, int64_t nb, const Workspace& w) {
  const int64_t v = p.shape.vocab;
  for (int64_t r = 0; r < nb; ++r) {
    const float* row = w.logits.data() + r * p.vp;
    switch (job.mode) {
      case Mode::kLogits:
        if (job.out_float) std::memcpy(job.out_float + (r0 + r) * v, row, v * sizeof(float));
        break;
      case Mode::kLoss:
        if (job.out_float) job.out_float[r0 + r] = -log_sum_exp(row, v).minus(row[job.targets[r0 + r]]);
        break;
      case Mode::kArgmax:
        job.out_index[r0 + r] = arg_max(row, v);
        break;
    }
  }
}

// Each row's part of RMSNorm's backward, inv_rms^3 * sum(dy * gain * SiLU(z)) / H, for ROWS rows from r at once
// (independent sums: one row's is a chain of dependent adds and a reduction).
template <int ROWS>
void norm_coefficients(const float* gain, const float* z, const float* sig, const float* dy, const float* rstd,
                       int64_t r, int64_t hp, float inv_h, float* coef) {
  VecF dot[ROWS];
#pragma GCC unroll 8
  for (int i = 0; i < ROWS; ++i) dot[i] = splat(0.0f);
  for (int64_t c = 0; c < hp; c += kVectorFloats) {
    const VecF g = load(gain + c);
#pragma GCC unroll 8
    for (int i = 0; i < ROWS; ++i) {
      const int64_t at = (r + i) * hp + c;
      dot[i] += load(dy + at) * load(z + at) * load(sig + at) * g;
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < ROWS; ++i) {
    const float inv_rms = rstd[r + i];
    coef[r + i] = inv_rms * inv_rms * inv_rms * sum_lanes(dot[i]) * inv_h;
  }
}

// norm_backward over NV vectors of columns from c: dz, and the gain's and the bias's gradients of those columns
// summed over the rows in registers.
template <int NV>
void norm_backward_columns(const float* gain, const float* z, const float* sig, const float* rstd, const float* coef,
                           const float* dy, int64_t nb, int64_t hp, int64_t c, float* dz, float* dgain,
                           float* dbias) {
  VecF g[NV], dg[NV], db[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    g[v] = load(gain + c + v * kVectorFloats);
    dg[v] = db[v] = splat(0.0f);
  }
  for (int64_t r = 0; r < nb; ++r) {
    const int64_t at = r * hp + c;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const int64_t i = at + v * kVectorFloats;
      const VecF zv = load(z + i), s = load(sig + i), dyv = load(dy + i);
      const VecF a = zv * s;  // SiLU(z)
      dg[v] += dyv * a * rstd[r];
      const VecF da = rstd[r] * dyv * g[v] - coef[r] * a;
      const VecF dzv = da * s * (splat(1.0f) + zv * (splat(1.0f) - s));
      store(dz + i, dzv);
      db[v] += dzv;
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    const int64_t i = c + v * kVectorFloats;
    store(dgain + i, load(dgain + i) + dg[v]);
    store(dbias + i, load(dbias + i) + db[v]);
  }
}

// dL/dz of one layer from dL/dh (dy, the gradient of RMSNorm(SiLU(z)) * gain); adds the gain's and the bias's
// gradients (the bias's is dz's column sums).
void norm_backward(const Packed& p, const float* gain, const float* z, const float* sig, const float* rstd,
                   const float* dy, int64_t nb, float* dz, float* dgain, float* dbias, Workspace& w) {
  const int64_t hp = p.hp;
  const float inv_h = 1.0f / static_cast<float>(p.shape.hidden);
  float* coef = w.coef.data();
  int64_t r = 0;
  for (; r + 4 <= nb; r += 4) norm_coefficients<4>(gain, z, sig, dy, rstd, r, hp, inv_h, coef);
  for (; r < nb; ++r) norm_coefficients<1>(gain, z, sig, dy, rstd, r, hp, inv_h, coef);
  constexpr int64_t chunk = 4 * kVectorFloats;
  int64_t c = 0;
  for (; c + chunk <= hp; c += chunk)
    norm_backward_columns<4>(gain, z, sig, rstd, coef, dy, nb, hp, c, dz, dgain, dbias);
  for (; c < hp; c += kVectorFloats) norm_backward_columns<1>(gain, z, sig, rstd, coef, dy, nb, hp, c, dz, dgain, dbias);
}

// sums[0:width] += the column sums of x [nb][width], a vector of columns at a time in a register.
void add_column_sums(const float* x, int64_t nb, int64_t width, float* sums) {
  for (int64_t c = 0; c < width; c += kVectorFloats) {
    VecF total = load(sums + c);
    for (int64_t r = 0; r < nb; ++r) total += load(x + r * width + c);
    store(sums + c, total);
  }
}

// dL/dlogits of the block, row-major in place of its logits ([nb][Vp]); for the loss, also the row losses
// (job.out_float, where set), from the same log-sum-exp.
void head_gradient(const Packed& p, const Job& job, int64_t r0, int64_t nb, Workspace& w) {
  const int64_t v = p.shape.vocab, vp = p.vp;
  for (int64_t r = 0; r < nb; ++r) {
    float* row = w.logits.data() + r * vp;
    if (job.mode == Mode::kLoss) {
      const float weight = job.grad[(r0 + r) * job.grad_stride];
      const LogSumExp lse = log_sum_exp(row, v);
      const int64_t target = job.targets[r0 + r];
      const float target_logit = row[target];
      if (job.out_float) job.out_float[r0 + r] = -lse.minus(target_logit);
      for (int64_t c = 0; c < v; c += kVectorFloats)  // the padding's lanes are cleared below
        store(row + c, weight * exp((load(row + c) - lse.max) - lse.log_rest));
      row[target] = weight * std::expm1(lse.minus(target_logit));  // p - 1 without the cancellation
    } else {
      std::memcpy(row, job.grad + (r0 + r) * v, v * sizeof(float));
    }
    std::fill(row + v, row + vp, 0.0f);
  }
}

// The highest set bit of any of the block's (masked) indices, plus one: the input layer's rows that the block
// touches are 0 .. that - 1.
int64_t bits_in_use(const int64_t* idx, int64_t nb, uint64_t mask) {
  uint64_t any = 0;
  for (int64_t r = 0; r < nb; ++r) any |= static_cast<uint64_t>(idx[r]);
  any &= mask;
  return any == 0 ? 0 : 64 - __builtin_clzll(any);
}

// out[r][b] = bit b of idx[r] as 0.0f / 1.0f for b < round_up(used, vector width), rows 64 floats apart.
void index_bits_as_floats(const int64_t* idx, int64_t nb, int64_t used, float* out) {
  VecI lane;
  for (int i = 0; i < kVectorFloats; ++i) lane[i] = i;
  for (int64_t r = 0; r < nb; ++r) {
    const uint64_t u = static_cast<uint64_t>(idx[r]);
    for (int64_t b = 0; b < used; b += kVectorFloats) {  // a vector's bits lie within one 32-bit half
      const VecI word = VecI{} + static_cast<int32_t>(static_cast<uint32_t>(u >> (b & 32)));
      const VecI bit = (word >> (lane + static_cast<int32_t>(b & 31))) & 1;
      store(out + r * 64 + b, __builtin_convertvector(bit, VecF));
    }
  }
}

// The input layer's weight gradient (in_weight^T, [B][Hp]) += bits^T @ dz: its rows are the index bits (0/1),
// a product over the block's rows instead of one scattered row add per set bit. Float32 in both precisions
// (the bf16 input layer sums weight rows, no product to round).
void add_input_weight_gradient(const Packed& p, const int64_t* idx, int64_t nb, const float* dz, float* grad,
                               Workspace& w) {
  const int64_t used = bits_in_use(idx, nb, bit_mask(p.shape.bits));
  if (used == 0) return;
  index_bits_as_floats(idx, nb, used, w.index_bits.data());
  matmul_add(w.index_bits.data(), 1, 64, dz, p.hp, grad, p.hp, used, nb, p.hp);
}

// Zeroes nb rows of hp floats.
void clear_rows(float* x, int64_t nb, int64_t hp) { std::fill(x, x + nb * hp, 0.0f); }

// The gradients of one block. dh: dL/dh of the layer being undone. Where that h is also the residual stream
// (the output of the input layer or of a residual layer), its gradient from the residual connections above is
// pending; the product for that h then adds into `pending` itself, which serves as dh, instead of being added
// later.
void backward_block(const Packed& p, const Job& job, int64_t r0, int64_t nb, Workspace& w, const GradLayout& g,
                    float* grads) {
  const Shape& s = p.shape;
  const int64_t hp = p.hp, last = s.hidden_layers;
  head_gradient(p, job, r0, nb, w);
  add_column_sums(w.logits.data(), nb, p.vp, grads + g.ob);
  transposed_times(p, w.logits.data(), p.vp, s.vocab, w.h_of(last), hp, nb, grads + g.out_w, w);  // dl^T @ h

  float* pending = w.pending.data();  // dL/d(the residual stream): the last residual layer's output, or h0
  // Whether h_of(layer) (0: the input layer's output) is the residual stream.
  auto carries_residual = [&](int64_t layer) { return layer == 0 || adds_residual(s, layer - 1); };
  clear_rows(pending, nb, hp);
  float* dh = carries_residual(last) ? pending : w.dh.data();
  if (dh != pending) clear_rows(dh, nb, hp);
  rows_times(p, w.logits.data(), p.vp, nb, p.out_w, p.out_w16.data(), s.vocab, dh, hp, w);
  for (int64_t l = last - 1; l >= 0; --l) {
    norm_backward(p, p.hg.data() + l * hp, w.z_of(l + 1), w.sig_of(l + 1), w.rstd_of(l + 1), dh, nb, w.dz.data(),
                  grads + g.hg + l * hp, grads + g.hb + l * hp, w);
    transposed_times(p, w.dz.data(), hp, s.hidden, w.h_of(l), hp, nb, grads + g.w + l * hp * hp, w);  // dz^T @ h
    dh = carries_residual(l) ? pending : w.dh.data();
    if (dh != pending) clear_rows(dh, nb, hp);
    rows_times(p, w.dz.data(), hp, nb, offset_or_null(p.w, l * hp * hp), offset_or_null(p.w16.data(), l * hp / 2 * hp),
               s.hidden, dh, hp, w);
  }
  norm_backward(p, p.in_g.data(), w.z_of(0), w.sig_of(0), w.rstd_of(0), dh, nb, w.dz.data(), grads + g.in_g,
                grads + g.in_b, w);
  add_input_weight_gradient(p, job.idx + r0, nb, w.dz.data(), grads + g.in_wt, w);
}

// v holding n elements for a fresh pack: zeroed where the pack has padding (which it never writes), else only
// resized (a pack reused at the same shape then neither allocates nor clears).
template <class T>
void fit(std::vector<T>& v, int64_t n, bool padded) {
  if (padded) {
    v.assign(n, T{});
  } else {
    v.resize(n);
  }
}

}  // namespace

// The sums of in_wt's rows for every value of each 4-bit group (Packed::group_sums), each from the entry of the
// value without its lowest bit plus that bit's row: one vector add per entry and vector.
void sum_groups(const std::vector<float>& in_wt, int64_t bits, int64_t hp, std::vector<float>& sums) {
  const int64_t groups = index_groups(bits);
  sums.resize(groups * kGroupValues * hp);
  for (int64_t g = 0; g < groups; ++g) {
    float* table = sums.data() + g * kGroupValues * hp;
    std::fill(table, table + hp, 0.0f);
    for (int64_t v = 1; v < kGroupValues; ++v) {
      const int64_t bit = g * kGroupBits + __builtin_ctzll(v);
      const float* without = table + (v & (v - 1)) * hp;
      float* out = table + v * hp;
      if (bit >= bits) {  // no index has this bit (masked); keeps every entry defined
        std::memcpy(out, without, hp * sizeof(float));
        continue;
      }
      const float* weights = in_wt.data() + bit * hp;
      for (int64_t j = 0; j < hp; j += kVectorFloats) store(out + j, load(without + j) + load(weights + j));
    }
  }
}

void Packed::pack(const Params& p, const Shape& s, bool for_backward, bool with_group_sums) {
  shape = s;
  hp = round_up(s.hidden, kVectorFloats);
  vp = round_up(s.vocab, kVectorFloats);
  w = out_w = nullptr;
  const int64_t h = s.hidden, n = s.hidden_layers;
  const bool padded = h != hp;  // vp > vocab (nearly always): the vocab-sized buffers are always cleared
  fit(in_wt, s.bits * hp, padded);
  fit(in_b, hp, padded);
  fit(in_g, hp, padded);
  fit(hb, n * hp, padded);
  fit(hg, n * hp, padded);
  fit(ob, vp, true);
  transpose_into(p.in_weight, h, s.bits, s.bits, in_wt.data(), hp);
  std::memcpy(in_b.data(), p.in_bias, h * sizeof(float));
  std::memcpy(in_g.data(), p.in_gain, h * sizeof(float));
  for (int64_t l = 0; l < n; ++l) {
    std::memcpy(hb.data() + l * hp, p.hidden_bias + l * h, h * sizeof(float));
    std::memcpy(hg.data() + l * hp, p.hidden_gain + l * h, h * sizeof(float));
  }
  std::memcpy(ob.data(), p.out_bias, s.vocab * sizeof(float));
  if (s.bf16)
    for (float& x : in_wt) x = bf16_round(x);
  if (with_group_sums) {
    sum_groups(in_wt, s.bits, hp, group_sums);
  } else {
    group_sums.clear();
  }
  if (s.bf16) {
    fit(wt16, n * hp / 2 * hp, padded);
    for (int64_t l = 0; l < n; ++l)
      pack_pairs(p.hidden_weight + l * h * h, 1, h, h, h, wt16.data() + l * hp / 2 * hp, hp);  // (W^T) pairs
    fit(out_wt16, hp / 2 * vp, true);
    pack_pairs(p.out_weight, 1, h, h, s.vocab, out_wt16.data(), vp);
    if (!for_backward) return;
    fit(w16, n * hp / 2 * hp, padded);
    for (int64_t l = 0; l < n; ++l)
      pack_pairs(p.hidden_weight + l * h * h, h, 1, h, h, w16.data() + l * hp / 2 * hp, hp);  // W pairs
    fit(out_w16, vp / 2 * hp, true);
    pack_pairs(p.out_weight, h, 1, s.vocab, h, out_w16.data(), hp);
    return;
  }
  fit(wt, n * hp * hp, padded);
  for (int64_t l = 0; l < n; ++l) transpose_into(p.hidden_weight + l * h * h, h, h, h, wt.data() + l * hp * hp, hp);
  fit(out_wt, hp * vp, true);
  transpose_into(p.out_weight, s.vocab, h, h, out_wt.data(), vp);
  if (padded) {
    fit(out_w_copy, s.vocab * hp, true);
    pad_rows(p.out_weight, s.vocab, h, out_w_copy.data(), hp);
  }
  out_w = padded ? out_w_copy.data() : p.out_weight;
  if (!for_backward) return;
  if (!padded) {
    w = p.hidden_weight;
    return;
  }
  fit(w_copy, n * hp * hp, true);
  for (int64_t l = 0; l < n; ++l) pad_rows(p.hidden_weight + l * h * h, h, h, w_copy.data() + l * hp * hp, hp);
  w = w_copy.data();
}

GradLayout::GradLayout(const Shape& s) {
  const int64_t hp = round_up(s.hidden, kVectorFloats), vp = round_up(s.vocab, kVectorFloats), n = s.hidden_layers;
  in_wt = 0;
  in_b = in_wt + s.bits * hp;
  in_g = in_b + hp;
  w = in_g + hp;
  hb = w + n * hp * hp;
  hg = hb + n * hp;
  out_w = hg + n * hp;
  ob = out_w + vp * hp;
  size = ob + vp;
}

ParamRows::ParamRows(const Shape& s) {
  const int64_t h = s.hidden, n = s.hidden_layers;
  const int64_t shape[8][2] = {{1, h * s.bits}, {1, h}, {1, h}, {n * h, h}, {n, h}, {n, h}, {s.vocab, h}, {1, s.vocab}};
  total = 0;
  for (int i = 0; i < 8; ++i) {
    rows[i] = shape[i][0];
    cols[i] = shape[i][1];
    total += rows[i];
  }
}

namespace {

// This thread's pack of the weights, kept across calls.
Packed& thread_pack() {
  thread_local Packed packed;
  return packed;
}

// The threads claim a job's blocks as they come free, not in equal shares fixed up front: on a shared machine one
// core can run the same work 1.5x slower than the other for seconds at a time (a 2-core VM, each core timed alone),
// and a fixed share makes every call wait for the slower one. A forward claims its blocks one at a time. A backward
// claims chunks of blocks, kChunksPerThread a thread, each summing its weight gradients in its own buffer; thread
// t's share is chunks t * kChunksPerThread onwards, which it runs first (their buffers stay in its cache from call
// to call) before taking what the others have not started. The chunks of each share are then added up in order,
// and the shares in order, so which thread ran a chunk does not change a result. A gradient too large for that
// many copies (over kMaxChunkedGradientBytes) keeps one chunk a thread.
constexpr int64_t kChunksPerThread = 4;
constexpr int64_t kMaxChunkedGradientBytes = int64_t{4} << 20;

int64_t chunks_per_share(const Job& job, int64_t gradient_floats) {
  if (!job.backward) return 1;
  return gradient_floats * static_cast<int64_t>(sizeof(float)) <= kMaxChunkedGradientBytes ? kChunksPerThread : 1;
}

// A thread expecting at least this many rows sums the input layer by 4-bit groups (Packed::group_sums): building them
// costs 15 vector adds per group and vector of Hp, repaid by the ~80 cycles it saved per row (seed model, 64 bits).
constexpr int64_t kGroupSumRows = 256;
// ... where the sums fit in L2 with room to spare (64 KB at H = 64 and 64 bits; 256 KB at H = 256).
constexpr int64_t kMaxGroupSumBytes = int64_t{256} << 10;

int64_t group_sums_bytes(const Shape& s) {
  return index_groups(s.bits) * kGroupValues * round_up(s.hidden, kVectorFloats) * 4;
}

// A thread's pack larger than this is freed after each call (a large vocabulary's head is tens of MB a thread;
// packing a model that large anew costs little against its rows).
constexpr int64_t kKeptPackBytes = int64_t{8} << 20;

// out[0:count] = the sum of the parts' floats from offset (zeros without parts).
void add_parts(const GradientParts& parts, int64_t offset, int64_t count, float* out) {
  int64_t j = 0;
  for (; j + kVectorFloats <= count; j += kVectorFloats) {
    VecF total = splat(0.0f);
    for (const float* part : parts) total += load(part + offset + j);
    store(out + j, total);
  }
  for (; j < count; ++j) {
    float total = 0.0f;
    for (const float* part : parts) total += part[offset + j];
    out[j] = total;
  }
}

}  // namespace

const GradientParts& run(const Params& params, const Shape& shape, const Job& job) {
  const int64_t rows = block_rows(job.n);
  const int64_t blocks = (job.n + rows - 1) / rows;
  const GradLayout layout(shape);
  // A forward: one block a chunk, one share a thread. A backward: a share a thread (as parallel_for splits the
  // blocks), its blocks in up to chunks_per_share chunks.
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), blocks);
  const int64_t shares = job.backward ? threads : blocks;
  const int64_t share_blocks = shares == 0 ? 0 : (blocks + shares - 1) / shares;  // the last shares may have fewer
  const int64_t per_share = std::min(share_blocks, chunks_per_share(job, layout.size));
  const int64_t chunk_blocks = per_share == 0 ? 0 : (share_blocks + per_share - 1) / per_share;
  const int64_t chunks = shares * per_share;  // chunk c: blocks of share c / per_share, some chunks empty
  auto chunk_range = [&](int64_t c) {
    const int64_t share_end = std::min(blocks, (c / per_share + 1) * share_blocks);
    const int64_t first = std::min(share_end, (c / per_share) * share_blocks + (c % per_share) * chunk_blocks);
    return std::make_pair(first, std::min(share_end, first + chunk_blocks));
  };
  const bool group_sums = job.n / std::max<int64_t>(threads, 1) >= kGroupSumRows &&
                          group_sums_bytes(shape) <= kMaxGroupSumBytes;
  // The caller's, reached from every thread (a thread_local named inside the lambda would be each thread's own).
  thread_local std::vector<std::vector<float>> caller_sums;  // the chunks' gradient sums, kept across calls
  thread_local GradientParts caller_parts;
  std::vector<std::vector<float>>& sums = caller_sums;
  GradientParts& parts = caller_parts;
  parts.clear();
  if (job.backward && static_cast<int64_t>(sums.size()) < chunks) sums.resize(chunks);
  std::vector<std::atomic<bool>> taken(chunks);
  at::parallel_for(0, threads, 1, [&](int64_t thread, int64_t) {
    Packed& packed = thread_pack();
    packed.pack(params, shape, job.backward, group_sums);
    Workspace& w = thread_workspace();
    w.prepare(packed, std::min(rows, job.n), job.backward);
    auto run_chunk = [&](int64_t c) {
      const auto [first, end] = chunk_range(c);
      if (first >= end || taken[c].exchange(true)) return;
      float* grads = nullptr;
      if (job.backward) {
        sums[c].assign(layout.size, 0.0f);
        grads = sums[c].data();
      }
      for (int64_t b = first; b < end; ++b) {
        const int64_t r0 = b * rows, nb = std::min(rows, job.n - r0);
        forward_block(packed, job.idx + r0, nb, w);
        if (job.backward) {
          backward_block(packed, job, r0, nb, w, layout, grads);  // writes the row losses itself
        } else {
          write_outputs(packed, job, r0, nb, w);
        }
      }
    };
    // This thread's own share first, then what is left, from the other shares' ends (where their own threads
    // would come last).
    if (job.backward) {
      for (int64_t c = thread * per_share; c < (thread + 1) * per_share; ++c) run_chunk(c);
    } else {
      for (int64_t c = thread; c < chunks; c += threads) run_chunk(c);
    }
    for (int64_t c = chunks - 1; c >= 0; --c) run_chunk(c);
    if (packed.bytes() > kKeptPackBytes) packed = Packed();
  });
  if (!job.backward) return parts;
  // Each share's chunks added up into its first chunk's buffer, in order, by the share's own thread (whose cache
  // holds them unless another took them).
  auto nonempty = [&](int64_t c) {
    const auto [first, end] = chunk_range(c);
    return first < end;
  };
  if (per_share > 1) {
    at::parallel_for(0, threads, 1, [&](int64_t first_share, int64_t end_share) {
      GradientParts chunk_sums;
      for (int64_t share = first_share; share < end_share; ++share) {
        chunk_sums.clear();
        for (int64_t c = share * per_share; c < (share + 1) * per_share && nonempty(c); ++c)
          chunk_sums.push_back(sums[c].data());
        if (chunk_sums.size() > 1)  // into the first chunk's buffer: each float is read before it is written
          add_parts(chunk_sums, 0, layout.size, sums[share * per_share].data());
      }
    });
  }
  for (int64_t share = 0; share < shares; ++share)
    if (nonempty(share * per_share)) parts.push_back(sums[share * per_share].data());
  return parts;
}

void sum_gradient_rows(const Shape& s, const GradientParts& parts, int64_t begin, int64_t end, float* const out[8]) {
  const GradLayout g(s);
  const int64_t h = s.hidden, hp = round_up(h, kVectorFloats);
  ParamRows(s).for_each(begin, end, [&](int param, int64_t row, int64_t count) {
    float* dst = out[param];
    switch (param) {
      case 0: {  // [B][Hp] summed, then transposed into [H][B]
        thread_local std::vector<float> sum;
        sum.resize(s.bits * hp);
        add_parts(parts, g.in_wt, s.bits * hp, sum.data());
        transpose_into(sum.data(), s.bits, h, hp, dst, s.bits);
        break;
      }
      case 1: add_parts(parts, g.in_b, h, dst); break;
      case 2: add_parts(parts, g.in_g, h, dst); break;
      case 3:  // row l * H + i of [L-2][H][H] is row l * Hp + i of the padded layers
        for (int64_t r = row; r < row + count; ++r)
          add_parts(parts, g.w + (r / h * hp + r % h) * hp, h, dst + r * h);
        break;
      case 4:
      case 5:
      case 6: {
        const int64_t base = param == 4 ? g.hb : param == 5 ? g.hg : g.out_w;
        for (int64_t r = row; r < row + count; ++r) add_parts(parts, base + r * hp, h, dst + r * h);
        break;
      }
      default: add_parts(parts, g.ob, s.vocab, dst); break;
    }
  });
}

}  // namespace aunn_cpu
