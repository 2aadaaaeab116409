// Element-block passes of the CPU kernel, written once and compiled per instruction set.
//
// Everything here is `always_inline` and is instantiated inside small wrapper functions that carry
// a `target(...)` attribute (small_fc_cpu.cpp): GCC then generates AVX-512 / AVX2+FMA / baseline
// code from the same source and the wrapper is picked at run time with __builtin_cpu_supports.
// That keeps the build portable (no -march=native) while using the machine's vector width.
//
// A block holds kBlock consecutive elements in structure-of-arrays form: feature channel ch of
// element e lives at x[ch * kBlock + e], so every MLP loop runs over contiguous elements.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "small_fc_geometry.h"
#include "small_fc_math.h"

#define LOZOO_INLINE inline __attribute__((always_inline))

namespace lozoo::cpu {

constexpr int kBlock = 64;         // elements per block: X (28×64) + two hidden buffers stay in L1
constexpr int64_t kTile = 4096;    // elements per reduction tile: fixed, so sums never depend
                                   // on the number of threads (bit-identical run to run)
constexpr int kLaneSum = 16;       // independent partial sums per channel inside a block

struct Layer {
  const float* w;  // (k, n) row-major, zero-padded
  const float* b;  // (n,), zero-padded
  int k, n;        // padded fan-in / fan-out; n is a multiple of the output tile
};

// Everything a tile needs; filled once per tensor and step by the host driver.
struct Ctx {
  Geometry geo;
  const void* grad;
  void* param;
  float* m;
  float* v;
  float* vd;  // rank ≤ 1 only
  // Factored statistics in SoA form, per decay k: value, rsqrt(value + 1e-8), row/col factor.
  const float* row_val[3];
  const float* row_rs[3];
  const float* row_f[3];
  const float* col_val[3];
  const float* col_rs[3];
  const float* col_f[3];
  float bm[3], ombm[3], bv, ombv, bf[3], ombf[3];
  bool maximize;
  const Layer* layers;
  int num_layers;
  float step_mult, exp_mult, lr, decay;
  bool has_decay;
  float* scratch;  // per thread: scratch_floats
  int64_t scratch_floats;
  double* tile_sums;  // [tiles][28]
};

template <typename T>
LOZOO_INLINE float load_f(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}
template <typename T>
LOZOO_INLINE void store_f(T* p, int64_t i, float x) {
  p[i] = static_cast<T>(x);
}

// Scratch layout of one thread (floats): x[28·B] | h0[hmax·B] | h1[hmax·B] | g[B] | p[B].
struct Scratch {
  float *x, *h0, *h1, *g, *p;
  LOZOO_INLINE Scratch(float* base, int hmax) {
    x = base;
    h0 = x + kElemFeatures * kBlock;
    h1 = h0 + hmax * kBlock;
    g = h1 + hmax * kBlock;
    p = g + kBlock;
  }
  static int64_t floats(int hmax) { return (kElemFeatures + 2 * hmax + 2) * kBlock; }
};

template <typename T>
LOZOO_INLINE void load_block(const Ctx& c, int64_t e0, int len, Scratch& s) {
  const T* grad = static_cast<const T*>(c.grad);
  const T* param = static_cast<const T*>(c.param);
  const float sign = c.maximize ? -1.0f : 1.0f;
  for (int e = 0; e < len; ++e) {
    s.g[e] = sign * load_f(grad, e0 + e);
    s.p[e] = load_f(param, e0 + e);
  }
}

// Feature computation over a block with every operand behind a __restrict pointer (or on the
// stack), so the compiler vectorises the per-element math of small_fc_math.h across elements.
LOZOO_INLINE void features_unfactored(int len, const float* __restrict g,
                                      const float* __restrict p, const float* __restrict m,
                                      const float* __restrict v, const float* __restrict vd,
                                      float* __restrict x) {
  for (int e = 0; e < len; ++e) {
    common_features(g[e], p[e], m + 3 * e, v[e], x + e, kBlock);
    unfactored_features(g[e], m + 3 * e, vd + 3 * e, x + e, kBlock);
  }
}

// Per-element broadcasts of the factored statistics, gathered into a block first.
struct Gathered {
  float mult[3][kBlock], row[3][kBlock], col[3][kBlock], rrs[3][kBlock], crs[3][kBlock];
  float rf[3][kBlock], cf[3][kBlock];
};

// How a statistic moves along a segment of consecutive elements (see gather_statistics).
enum class Walk { kContiguous, kConstant, kPeriodic };

// dst[t] = src[t], src[0], or src[(phase + t) mod period] for t < len. The periodic case is a
// run of short contiguous copies: compilers emulate gathers with scalar loads on x86.
LOZOO_INLINE void gather_segment(float* __restrict dst, const float* __restrict src, int len,
                                 Walk walk, int phase, int period) {
  if (walk == Walk::kContiguous) {
    for (int t = 0; t < len; ++t) dst[t] = src[t];
  } else if (walk == Walk::kConstant) {
    const float value = src[0];
    for (int t = 0; t < len; ++t) dst[t] = value;
  } else {
    for (int t = 0; t < len; phase = 0) {
      const int n = period - phase < len - t ? period - phase : len - t;
      for (int i = 0; i < n; ++i) dst[t + i] = src[phase + i];
      t += n;
    }
  }
}

// In the [A, Sa, B, Sb, C] view (small_fc_geometry.h) consecutive elements of one "row" (fixed
// α, i_a, β; Sb·C elements) walk the a-stat (axis a removed) contiguously, while the b-stat
// (axis b removed) stays put (C = 1) or cycles through its C entries for that row (C > 1, e.g.
// the kernel taps of a conv weight). So gathers become copies, broadcasts, or repeated short
// copies of those C entries; divisions happen once per row, not per element.
LOZOO_INLINE void gather_statistics(const Ctx& c, int64_t e0, int len, Gathered& gat,
                                    bool with_stats) {
  const Geometry& g = c.geo;
  const int64_t run = g.Sb * g.C;
  int64_t o = e0 / run, j = e0 - o * run;
  for (int pos = 0; pos < len;) {
    const int64_t alpha = o / (g.Sa * g.B), beta = o % g.B;
    const int seg = static_cast<int>(run - j < len - pos ? run - j : len - pos);
    const int64_t ia = (alpha * g.B + beta) * run + j, ib = o * g.C;
    const Walk b_walk = g.C == 1 ? Walk::kConstant : Walk::kPeriodic;
    // Periodic walk: the b-stat cycles through its C entries o·C + γ, starting at γ = j mod C.
    const int phase = static_cast<int>(j % g.C), period = static_cast<int>(g.C);
    const int64_t ri = g.d0_is_a ? ia : ib, ci = g.d0_is_a ? ib : ia;
    const Walk r_walk = g.d0_is_a ? Walk::kContiguous : b_walk;
    const Walk c_walk = g.d0_is_a ? b_walk : Walk::kContiguous;
    for (int k = 0; k < 3; ++k) {
      gather_segment(gat.rf[k] + pos, c.row_f[k] + ri, seg, r_walk, phase, period);
      gather_segment(gat.cf[k] + pos, c.col_f[k] + ci, seg, c_walk, phase, period);
      if (!with_stats) continue;
      gather_segment(gat.row[k] + pos, c.row_val[k] + ri, seg, r_walk, phase, period);
      gather_segment(gat.rrs[k] + pos, c.row_rs[k] + ri, seg, r_walk, phase, period);
      gather_segment(gat.col[k] + pos, c.col_val[k] + ci, seg, c_walk, phase, period);
      gather_segment(gat.crs[k] + pos, c.col_rs[k] + ci, seg, c_walk, phase, period);
    }
    pos += seg;
    j += seg;
    if (j == run) {
      j = 0;
      ++o;
    }
  }
  for (int k = 0; k < 3; ++k)
    for (int e = 0; e < len; ++e) gat.mult[k][e] = gat.rf[k][e] * gat.cf[k][e];
}

LOZOO_INLINE void features_factored(int len, const float* __restrict g,
                                    const float* __restrict p, const float* __restrict m,
                                    const float* __restrict v, const Gathered& __restrict s,
                                    float* __restrict x, bool with_stats) {
  for (int e = 0; e < len; ++e) {
    const float mult[3] = {s.mult[0][e], s.mult[1][e], s.mult[2][e]};
    common_features(g[e], p[e], m + 3 * e, v[e], x + e, kBlock);
    factored_element_features(g[e], m + 3 * e, mult, x + e, kBlock);
  }
  if (!with_stats) return;
  for (int e = 0; e < len; ++e) {
    const float row[3] = {s.row[0][e], s.row[1][e], s.row[2][e]};
    const float col[3] = {s.col[0][e], s.col[1][e], s.col[2][e]};
    const float rrs[3] = {s.rrs[0][e], s.rrs[1][e], s.rrs[2][e]};
    const float crs[3] = {s.crs[0][e], s.crs[1][e], s.crs[2][e]};
    factored_stat_features(row, col, rrs, crs, x + e, kBlock);
  }
}

// The 28 raw features of a block from the *updated* state (docs/design/small_fc_lopt.md §4.4 step 3). Lanes past `len`
// are zeroed so they add nothing to the channel sums and cannot produce NaNs or denormals.
// Without `with_stats` the factored channels 13-24 are left out: they are constant along d0 or
// d1, so pass 1 sums their squares from the statistics instead (stat_channel_sums).
LOZOO_INLINE void fill_features(const Ctx& c, int64_t e0, int len, const Scratch& s,
                                bool with_stats = true) {
  float* x = s.x;
  if (c.geo.factored) {
    Gathered gat;
    gather_statistics(c, e0, len, gat, with_stats);
    features_factored(len, s.g, s.p, c.m + 3 * e0, c.v + e0, gat, x, with_stats);
  } else {
    features_unfactored(len, s.g, s.p, c.m + 3 * e0, c.v + e0, c.vd + 3 * e0, x);
  }
  if (len < kBlock)
    for (int ch = 0; ch < kElemFeatures; ++ch)
      std::memset(x + ch * kBlock + len, 0, sizeof(float) * (kBlock - len));
}

// Accumulator updates of one block (design §4): momenta, RMS and, for rank ≤ 1, vd.
LOZOO_INLINE void update_moments(const Ctx& c, int len, const float* __restrict g,
                                 float* __restrict m, float* __restrict v, float* __restrict vd) {
  const float bm0 = c.bm[0], bm1 = c.bm[1], bm2 = c.bm[2];
  const float om0 = c.ombm[0], om1 = c.ombm[1], om2 = c.ombm[2];
  for (int e = 0; e < len; ++e) {
    m[3 * e] = ema(bm0, om0, m[3 * e], g[e]);
    m[3 * e + 1] = ema(bm1, om1, m[3 * e + 1], g[e]);
    m[3 * e + 2] = ema(bm2, om2, m[3 * e + 2], g[e]);
  }
  for (int e = 0; e < len; ++e) v[e] = ema(c.bv, c.ombv, v[e], g[e] * g[e]);
  if (vd == nullptr) return;
  const float bf0 = c.bf[0], bf1 = c.bf[1], bf2 = c.bf[2];
  const float of0 = c.ombf[0], of1 = c.ombf[1], of2 = c.ombf[2];
  for (int e = 0; e < len; ++e) {
    const float gs = squared_grad(g[e]);
    vd[3 * e] = ema(bf0, of0, vd[3 * e], gs);
    vd[3 * e + 1] = ema(bf1, of1, vd[3 * e + 1], gs);
    vd[3 * e + 2] = ema(bf2, of2, vd[3 * e + 2], gs);
  }
}

// out[o] = act(b[o] + Σ_j in[j]·w[j, o]) over a block: OB outputs × NV vectors of VW elements
// are kept in registers while the fan-in streams through.
template <int VW, int OB, int NV>
LOZOO_INLINE void dense(const float* in, const Layer& L, float* out, bool relu) {
  typedef float V __attribute__((vector_size(VW * sizeof(float))));
  static_assert(kBlock % (VW * NV) == 0, "block must be a multiple of the register tile");
  for (int e = 0; e < kBlock; e += VW * NV) {
    for (int o = 0; o < L.n; o += OB) {
      V acc[OB][NV];
      for (int q = 0; q < OB; ++q)
        for (int u = 0; u < NV; ++u) acc[q][u] = V{} + L.b[o + q];
      for (int j = 0; j < L.k; ++j) {
        V xv[NV];
        for (int u = 0; u < NV; ++u) std::memcpy(&xv[u], in + j * kBlock + e + u * VW, sizeof(V));
        const float* w = L.w + j * L.n + o;
        for (int q = 0; q < OB; ++q)
          for (int u = 0; u < NV; ++u) acc[q][u] += xv[u] * w[q];
      }
      for (int q = 0; q < OB; ++q)
        for (int u = 0; u < NV; ++u) {
          V a = acc[q][u];
          if (relu) a = a < V{} ? V{} : a;  // keeps NaN, like torch.relu
          std::memcpy(out + (o + q) * kBlock + e + u * VW, &a, sizeof(V));
        }
    }
  }
}

// Which channel sums pass 1 takes element by element. Rank ≥ 2: not 13-24 (constant along an
// axis; summed from the statistics). Rank ≤ 1: not 16-18 / 22-24, copies of 13-15 / 19-21.
LOZOO_INLINE bool summed_per_element(bool factored, int ch) {
  if (factored) return ch < 13 || ch >= 25;
  return !((ch >= 16 && ch < 19) || (ch >= 22 && ch < 25));
}

// Pass 2 of design §13 for one tile: update m, v (and vd) per element and add the squares of the
// 28 features to the tile's channel sums.
template <int VW, typename T>
LOZOO_INLINE void accumulate_tile(const Ctx& c, int64_t tile, float* scratch_base, int hmax) {
  Scratch s(scratch_base, hmax);
  const int64_t begin = tile * kTile;
  const int64_t end = begin + kTile < c.geo.n ? begin + kTile : c.geo.n;
  // Per channel, kLaneSum fp32 partial sums within a block (4 squares each), added lane-wise
  // into fp64 tile lanes; lanes are summed once per tile. All orders are fixed.
  double lanes64[kElemFeatures][kLaneSum] = {};
  for (int64_t e0 = begin; e0 < end; e0 += kBlock) {
    const int len = static_cast<int>(end - e0 < kBlock ? end - e0 : kBlock);
    load_block<T>(c, e0, len, s);
    update_moments(c, len, s.g, c.m + 3 * e0, c.v + e0,
                   c.geo.factored ? nullptr : c.vd + 3 * e0);
    fill_features(c, e0, len, s, /*with_stats=*/false);
    for (int ch = 0; ch < kElemFeatures; ++ch) {
      if (!summed_per_element(c.geo.factored, ch)) continue;
      const float* x = s.x + ch * kBlock;
      float lanes[kLaneSum] = {};
      for (int e = 0; e < kBlock; e += kLaneSum)
        for (int l = 0; l < kLaneSum; ++l) lanes[l] += x[e + l] * x[e + l];
      for (int l = 0; l < kLaneSum; ++l) lanes64[ch][l] += lanes[l];
    }
  }
  for (int ch = 0; ch < kElemFeatures; ++ch) {
    double sum = 0.0;
    for (int l = 0; l < kLaneSum; ++l) sum += lanes64[ch][l];
    c.tile_sums[tile * kElemFeatures + ch] = sum;
  }
}

// p ← p·(1 − lr·wd) − lr·step for one block, stored in p's dtype.
template <typename T>
LOZOO_INLINE void write_params(const Ctx& c, int len, const float* __restrict d,
                               const float* __restrict mag, const float* __restrict p,
                               T* __restrict dst) {
  const float sm = c.step_mult, em = c.exp_mult, lr = c.lr, decay = c.decay;
  const bool has_decay = c.has_decay;
  for (int e = 0; e < len; ++e)
    store_f(dst, e, apply_step(p[e], learned_step(d[e], mag[e], sm, em), lr, decay, has_decay));
}

// Pass 3 for one tile: features → folded MLP → learned step → p, written in p's dtype.
template <int VW, int NV, typename T>
LOZOO_INLINE void update_tile(const Ctx& c, int64_t tile, float* scratch_base, int hmax) {
  Scratch s(scratch_base, hmax);
  T* param = static_cast<T*>(c.param);
  const int64_t begin = tile * kTile;
  const int64_t end = begin + kTile < c.geo.n ? begin + kTile : c.geo.n;
  for (int64_t e0 = begin; e0 < end; e0 += kBlock) {
    const int len = static_cast<int>(end - e0 < kBlock ? end - e0 : kBlock);
    load_block<T>(c, e0, len, s);
    fill_features(c, e0, len, s);
    const float* in = s.x;
    float* bufs[2] = {s.h0, s.h1};
    for (int l = 0; l + 1 < c.num_layers; ++l) {
      dense<VW, 4, NV>(in, c.layers[l], bufs[l % 2], true);
      in = bufs[l % 2];
    }
    float* out = bufs[(c.num_layers - 1) % 2];
    dense<VW, 2, NV>(in, c.layers[c.num_layers - 1], out, false);
    write_params(c, len, out, out + kBlock, s.p, param + e0);
  }
}

}  // namespace lozoo::cpu
