// The fused CPU AUNN (see mlp.h). One block of rows goes through every layer while its activations stay in
// cache: the input layer as the sum of the weight rows of the index's set bits, the hidden products and the
// head through tile.h's register-blocked product, the loss without writing logits out, and, for a backward,
// every layer's gradients from the block's stored activations. Weight gradients are summed per thread and
// reduced once at the end.
#include "mlp.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "tile.h"

namespace aunn_cpu {
namespace {

// Rows per block: eight 6-row tiles. The block's activations stay in L2 up to H = 128; wider layers keep
// 48 rows too, as fewer would read each layer's weights (and write its weight gradient) more often per row.
constexpr int64_t kBlockRows = 48;

void pad_rows(const float* src, int64_t rows, int64_t cols, float* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * ld, src + r * cols, cols * sizeof(float));
}

// dst[c * ld + r] = src[r * src_ld + c] for the rows x cols top-left of src.
void transpose_into(const float* src, int64_t rows, int64_t cols, int64_t src_ld, float* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ld + r] = src[r * src_ld + c];
}

// Per-block buffers of one thread.
struct Workspace {
  int64_t rows, hp, vp, layers;  // layers: the input layer and the hidden ones
  std::vector<float> z, sig, h, rstd, logits, dh, dz, pending;
  Workspace(const Packed& p, int64_t rows_, bool backward)
      : rows(rows_), hp(p.hp), vp(p.vp), layers(p.shape.hidden_layers + 1),
        z(layers * rows * hp), sig(layers * rows * hp), h(layers * rows * hp), rstd(layers * rows),
        logits(rows * vp) {
    if (backward) {
      dh.resize(rows * hp);
      dz.resize(rows * hp);
      pending.resize(rows * hp);
    }
  }
  float* z_of(int64_t layer) { return z.data() + layer * rows * hp; }
  float* sig_of(int64_t layer) { return sig.data() + layer * rows * hp; }
  float* h_of(int64_t layer) { return h.data() + layer * rows * hp; }
  float* rstd_of(int64_t layer) { return rstd.data() + layer * rows; }
};

bool adds_residual(const Shape& s, int64_t hidden_layer) { return (hidden_layer + 1) % s.residual_every == 0; }

uint64_t bit_mask(int64_t bits) { return bits >= 64 ? ~uint64_t{0} : (uint64_t{1} << bits) - 1; }

// h = RMSNorm(SiLU(z)) * gain (+ res) for nb rows; keeps sigmoid(z) and 1/rms for the backward.
void activate(const Packed& p, const float* gain, const float* res, int64_t nb, float* z, float* sig, float* h,
              float* rstd) {
  const int64_t hp = p.hp;
  const float inv_h = 1.0f / static_cast<float>(p.shape.hidden);
  for (int64_t r = 0; r < nb; ++r) {
    const float* zr = z + r * hp;
    float* sr = sig + r * hp;
    VecF sum_sq = splat(0.0f);
    for (int64_t c = 0; c < hp; c += kVectorFloats) {
      const VecF zv = load(zr + c);
      const VecF s = splat(1.0f) / (splat(1.0f) + exp(-zv));
      store(sr + c, s);
      const VecF a = zv * s;
      sum_sq += a * a;
    }
    const float inv_rms = 1.0f / std::sqrt(sum_lanes(sum_sq) * inv_h + p.shape.eps);
    rstd[r] = inv_rms;
    float* hr = h + r * hp;
    for (int64_t c = 0; c < hp; c += kVectorFloats) {
      VecF y = load(zr + c) * load(sr + c) * inv_rms * load(gain + c);
      if (res != nullptr) y += load(res + r * hp + c);
      store(hr + c, y);
    }
  }
}

void broadcast_rows(const float* row, int64_t nb, int64_t width, float* dst) {
  for (int64_t r = 0; r < nb; ++r) std::memcpy(dst + r * width, row, width * sizeof(float));
}

void forward_block(const Packed& p, const int64_t* idx, int64_t nb, Workspace& w) {
  const Shape& s = p.shape;
  const int64_t hp = p.hp;
  float* z0 = w.z_of(0);
  const uint64_t mask = bit_mask(s.bits);
  constexpr int64_t chunk = 4 * kVectorFloats;  // four vectors of sums held in registers over the set bits
  for (int64_t r = 0; r < nb; ++r) {
    const uint64_t bits = static_cast<uint64_t>(idx[r]) & mask;
    int64_t c = 0;
    for (; c + chunk <= hp; c += chunk)
      sum_rows_of_bits<4>(p.in_b.data() + c, p.in_wt.data() + c, hp, bits, z0 + r * hp + c);
    for (; c < hp; c += kVectorFloats)
      sum_rows_of_bits<1>(p.in_b.data() + c, p.in_wt.data() + c, hp, bits, z0 + r * hp + c);
  }
  activate(p, p.in_g.data(), nullptr, nb, z0, w.sig_of(0), w.h_of(0), w.rstd_of(0));
  const float* res = w.h_of(0);
  for (int64_t l = 0; l < s.hidden_layers; ++l) {
    float* z = w.z_of(l + 1);
    broadcast_rows(p.hb.data() + l * hp, nb, hp, z);
    matmul_add(w.h_of(l), hp, 1, p.wt.data() + l * hp * hp, hp, z, hp, nb, s.hidden, hp);
    const bool residual = adds_residual(s, l);
    activate(p, p.hg.data() + l * hp, residual ? res : nullptr, nb, z, w.sig_of(l + 1), w.h_of(l + 1),
             w.rstd_of(l + 1));
    if (residual) res = w.h_of(l + 1);
  }
  broadcast_rows(p.ob.data(), nb, p.vp, w.logits.data());
  matmul_add(w.h_of(s.hidden_layers), hp, 1, p.out_wt.data(), p.vp, w.logits.data(), p.vp, nb, s.hidden, p.vp);
}

// log(sum(exp(row))) over the first v entries, kept as max + log1p(the other entries' share) and never summed
// into one float: row[i] - lse is then (row[i] - max) - log_rest, and a confident row's loss and its target's
// gradient (p - 1) keep their digits instead of losing them to a rounding of lse (~2.4e-7 at lse ~ 2).
struct LogSumExp {
  float max, log_rest;
  float minus(float x) const { return (x - max) - log_rest; }  // x - lse
};

LogSumExp log_sum_exp(const float* row, int64_t v) {
  int64_t top = 0;
  for (int64_t i = 1; i < v; ++i)
    if (row[i] > row[top]) top = i;
  float rest = 0.0f;
  for (int64_t i = 0; i < v; ++i)
    if (i != top) rest += std::exp(row[i] - row[top]);
  return {row[top], std::log1p(rest)};
}

// torch.argmax's choice: the first maximum, a NaN counting as the largest value.
int64_t arg_max(const float* row, int64_t v) {
  int64_t best = 0;
  for (int64_t i = 1; i < v; ++i) {
    if (std::isnan(row[best])) break;
    if (row[i] > row[best] || std::isnan(row[i])) best = i;
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

// dL/dz of one layer from dL/dh (dy, the gradient of RMSNorm(SiLU(z)) * gain); adds the gain's gradient.
void norm_backward(const Packed& p, const float* gain, const float* z, const float* sig, const float* rstd,
                   const float* dy, int64_t nb, float* dz, float* dgain) {
  const int64_t hp = p.hp;
  const float inv_h = 1.0f / static_cast<float>(p.shape.hidden);
  for (int64_t r = 0; r < nb; ++r) {
    const float* zr = z + r * hp;
    const float* sr = sig + r * hp;
    const float* dyr = dy + r * hp;
    float* dzr = dz + r * hp;
    const float inv_rms = rstd[r];
    VecF dot = splat(0.0f);
    for (int64_t c = 0; c < hp; c += kVectorFloats) {
      const VecF a = load(zr + c) * load(sr + c);
      const VecF dy_a = load(dyr + c) * a;
      dot += dy_a * load(gain + c);
      store(dgain + c, load(dgain + c) + dy_a * inv_rms);
    }
    const float coef = inv_rms * inv_rms * inv_rms * sum_lanes(dot) * inv_h;
    for (int64_t c = 0; c < hp; c += kVectorFloats) {
      const VecF zv = load(zr + c), s = load(sr + c);
      const VecF da = inv_rms * load(dyr + c) * load(gain + c) - coef * (zv * s);
      store(dzr + c, da * s * (splat(1.0f) + zv * (splat(1.0f) - s)));
    }
  }
}

void add_column_sums(const float* x, int64_t nb, int64_t width, float* sums) {
  for (int64_t r = 0; r < nb; ++r) {
    const float* xr = x + r * width;
#pragma omp simd
    for (int64_t c = 0; c < width; ++c) sums[c] += xr[c];
  }
}

// dL/dlogits of the block, row-major in place of its logits ([nb][Vp]).
void head_gradient(const Packed& p, const Job& job, int64_t r0, int64_t nb, Workspace& w) {
  const int64_t v = p.shape.vocab, vp = p.vp;
  for (int64_t r = 0; r < nb; ++r) {
    float* row = w.logits.data() + r * vp;
    if (job.mode == Mode::kLoss) {
      const float weight = job.grad[(r0 + r) * job.grad_stride];
      const LogSumExp lse = log_sum_exp(row, v);
      const int64_t target = job.targets[r0 + r];
      const float target_logit = row[target];
      for (int64_t i = 0; i < v; ++i) row[i] = weight * std::exp(lse.minus(row[i]));
      row[target] = weight * std::expm1(lse.minus(target_logit));  // p - 1 without the cancellation
    } else {
      std::memcpy(row, job.grad + (r0 + r) * v, v * sizeof(float));
    }
    std::fill(row + v, row + vp, 0.0f);
  }
}

void backward_block(const Packed& p, const Job& job, int64_t r0, int64_t nb, Workspace& w, const GradLayout& g,
                    float* grads) {
  const Shape& s = p.shape;
  const int64_t hp = p.hp, last = s.hidden_layers;
  head_gradient(p, job, r0, nb, w);
  add_column_sums(w.logits.data(), nb, p.vp, grads + g.ob);
  matmul_add(w.logits.data(), 1, p.vp, w.h_of(last), hp, grads + g.out_w, hp, s.vocab, nb, hp);  // dl^T @ h
  std::fill(w.dh.begin(), w.dh.end(), 0.0f);
  matmul_add(w.logits.data(), p.vp, 1, p.out_w.data(), hp, w.dh.data(), hp, nb, s.vocab, hp);

  std::fill(w.pending.begin(), w.pending.end(), 0.0f);  // dL/d(the running residual), not yet added
  float* dh = w.dh.data();
  float* pending = w.pending.data();
  for (int64_t l = last - 1; l >= 0; --l) {
    if (adds_residual(s, l)) {  // h = y + res, and h is the next residual layer's res
      for (int64_t i = 0; i < nb * hp; ++i) {
        dh[i] += pending[i];
        pending[i] = dh[i];
      }
    }
    norm_backward(p, p.hg.data() + l * hp, w.z_of(l + 1), w.sig_of(l + 1), w.rstd_of(l + 1), dh, nb, w.dz.data(),
                  grads + g.hg + l * hp);
    add_column_sums(w.dz.data(), nb, hp, grads + g.hb + l * hp);
    matmul_add(w.dz.data(), 1, hp, w.h_of(l), hp, grads + g.w + l * hp * hp, hp, s.hidden, nb, hp);  // dz^T @ h
    std::fill(w.dh.begin(), w.dh.end(), 0.0f);
    matmul_add(w.dz.data(), hp, 1, p.w.data() + l * hp * hp, hp, dh, hp, nb, s.hidden, hp);
  }
  for (int64_t i = 0; i < nb * hp; ++i) dh[i] += pending[i];
  norm_backward(p, p.in_g.data(), w.z_of(0), w.sig_of(0), w.rstd_of(0), dh, nb, w.dz.data(), grads + g.in_g);
  add_column_sums(w.dz.data(), nb, hp, grads + g.in_b);
  const uint64_t mask = bit_mask(s.bits);
  for (int64_t r = 0; r < nb; ++r) {
    const float* dzr = w.dz.data() + r * hp;
    for (uint64_t u = static_cast<uint64_t>(job.idx[r0 + r]) & mask; u != 0; u &= u - 1) {
      float* col = grads + g.in_wt + __builtin_ctzll(u) * hp;
#pragma omp simd
      for (int64_t c = 0; c < hp; ++c) col[c] += dzr[c];
    }
  }
}

}  // namespace

Packed::Packed(const Params& p, const Shape& s, bool for_backward)
    : shape(s), hp(round_up(s.hidden, kVectorFloats)), vp(round_up(s.vocab, kVectorFloats)),
      in_wt(s.bits * hp), in_b(hp), in_g(hp), wt(s.hidden_layers * hp * hp),
      hb(s.hidden_layers * hp), hg(s.hidden_layers * hp), out_wt(hp * vp), ob(vp) {
  const int64_t h = s.hidden, n = s.hidden_layers;
  transpose_into(p.in_weight, h, s.bits, s.bits, in_wt.data(), hp);
  std::memcpy(in_b.data(), p.in_bias, h * sizeof(float));
  std::memcpy(in_g.data(), p.in_gain, h * sizeof(float));
  for (int64_t l = 0; l < n; ++l) {
    transpose_into(p.hidden_weight + l * h * h, h, h, h, wt.data() + l * hp * hp, hp);
    std::memcpy(hb.data() + l * hp, p.hidden_bias + l * h, h * sizeof(float));
    std::memcpy(hg.data() + l * hp, p.hidden_gain + l * h, h * sizeof(float));
  }
  transpose_into(p.out_weight, s.vocab, h, h, out_wt.data(), vp);
  std::memcpy(ob.data(), p.out_bias, s.vocab * sizeof(float));
  if (for_backward) {
    w.resize(n * hp * hp);
    for (int64_t l = 0; l < n; ++l) pad_rows(p.hidden_weight + l * h * h, h, h, w.data() + l * hp * hp, hp);
    out_w.resize(vp * hp);
    pad_rows(p.out_weight, s.vocab, h, out_w.data(), hp);
  }
}

GradLayout::GradLayout(const Packed& p) {
  const int64_t hp = p.hp, n = p.shape.hidden_layers;
  in_wt = 0;
  in_b = in_wt + p.shape.bits * hp;
  in_g = in_b + hp;
  w = in_g + hp;
  hb = w + n * hp * hp;
  hg = hb + n * hp;
  out_w = hg + n * hp;
  ob = out_w + p.vp * hp;
  size = ob + p.vp;
}

std::vector<float> run(const Packed& packed, const Job& job) {
  const int64_t rows = kBlockRows;
  const int64_t blocks = (job.n + rows - 1) / rows;
  const GradLayout layout(packed);
  std::vector<std::vector<float>> thread_grads(job.backward ? at::get_num_threads() : 0);
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t end) {
    Workspace w(packed, std::min(rows, job.n - first * rows), job.backward);
    float* grads = nullptr;
    if (job.backward) {
      const int tid = at::get_thread_num();
      TORCH_CHECK(tid < static_cast<int>(thread_grads.size()), "aunn_fast cpp: thread ", tid, " out of range");
      thread_grads[tid].assign(layout.size, 0.0f);
      grads = thread_grads[tid].data();
    }
    for (int64_t b = first; b < end; ++b) {
      const int64_t r0 = b * rows, nb = std::min(rows, job.n - r0);
      forward_block(packed, job.idx + r0, nb, w);
      write_outputs(packed, job, r0, nb, w);
      if (job.backward) backward_block(packed, job, r0, nb, w, layout, grads);
    }
  });
  if (!job.backward) return {};
  std::vector<float> total(layout.size, 0.0f);
  for (const auto& part : thread_grads) {
    if (part.empty()) continue;
    for (int64_t i = 0; i < layout.size; ++i) total[i] += part[i];
  }
  return total;
}

void unpack_gradients(const Packed& p, const std::vector<float>& grads, float* const out[8]) {
  const GradLayout g(p);
  const Shape& s = p.shape;
  const int64_t h = s.hidden, hp = p.hp, n = s.hidden_layers;
  const float* src = grads.data();
  transpose_into(src + g.in_wt, s.bits, h, hp, out[0], s.bits);  // [B][Hp] -> [H][B], padding dropped
  std::memcpy(out[1], src + g.in_b, h * sizeof(float));
  std::memcpy(out[2], src + g.in_g, h * sizeof(float));
  for (int64_t l = 0; l < n; ++l) {
    for (int64_t r = 0; r < h; ++r)
      std::memcpy(out[3] + (l * h + r) * h, src + g.w + (l * hp + r) * hp, h * sizeof(float));
    std::memcpy(out[4] + l * h, src + g.hb + l * hp, h * sizeof(float));
    std::memcpy(out[5] + l * h, src + g.hg + l * hp, h * sizeof(float));
  }
  for (int64_t v = 0; v < s.vocab; ++v) std::memcpy(out[6] + v * h, src + g.out_w + v * hp, h * sizeof(float));
  std::memcpy(out[7], src + g.ob, s.vocab * sizeof(float));
}

}  // namespace aunn_cpu
