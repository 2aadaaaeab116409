// CPU kernel of lozoo::velo_mlp_step_ (docs/design/velo.md): VeLO's per-element features, their
// per-channel normalisation, the tensor's MLP, the step and the write, in two sweeps over tiles
// and never the n×30 feature matrix. The accumulators (m, v, r, c, vd) and the row/column factors
// are updated by the caller in torch; this op only reads them.
//   1. Per tile: build the 30 features, sum their squares per channel (and p²), in double.
//   2. Fold the per-channel normaliser into w0 (exact up to rounding), then per tile:
//      features → MLP → step → p.
// Tiles and summation orders are fixed, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "velo_math.h"

namespace lozoo::velo {
namespace {

constexpr int64_t kTile = 256;
constexpr int kSums = kFeatures + 1;  // 30 channels and p²

struct Mlp {
  std::vector<float> w;  // every layer's (in, out) weights, w0 pre-scaled
  std::vector<float> b;
  std::vector<int> fan_in, fan_out, w_off, b_off;
};

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VELO_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VELO_CLONES
#endif

// Decay-major copies of the statistics (stat[k][i] instead of stat[3i + k]) so that a tile's
// loop over elements loads them with plain indexed loads, plus rsqrt(stat + 1e-8) computed once
// per statistic entry rather than once per element.
struct Stats {
  const float* row[3];
  const float* col[3];
  const float* rf[3];
  const float* cf[3];
  const float* row_rs[3];
  const float* col_rs[3];
};

// The features of one tile into x (structure of arrays, row stride kTile). Factored tensors walk
// the coordinates [A, Sa, B, Sb, C] of the geometry incrementally (no division per element) into
// index buffers; the feature loop itself then has no control flow and vectorises.
LOZOO_HD void tile_features(const View& s, const Stats& q, int64_t e0, int64_t len, float* x) {
  const float* __restrict g = s.g + e0;
  const float* __restrict p = s.p + e0;
  const float* __restrict m = s.m + 3 * e0;
  const float* __restrict v = s.v + e0;
  const Geometry& geo = s.geo;
  if (!geo.factored) {
    const float* __restrict vd = s.vd + 3 * e0;
    float* __restrict out = x;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i)
      write_features(g[i], p[i], m + 3 * i, v[i], unfactored_inputs(vd + 3 * i), out + i, kTile);
    return;
  }
  int64_t ri_buf[kTile], ci_buf[kTile];
  int64_t rest = e0;
  int64_t gamma = rest % geo.C;
  rest /= geo.C;
  int64_t ib = rest % geo.Sb;
  rest /= geo.Sb;
  int64_t beta = rest % geo.B;
  rest /= geo.B;
  int64_t ia = rest % geo.Sa;
  int64_t alpha = rest / geo.Sa;
  for (int64_t i = 0; i < len; ++i) {
    const int64_t a_stat = ((alpha * geo.B + beta) * geo.Sb + ib) * geo.C + gamma;  // ia removed
    const int64_t b_stat = ((alpha * geo.Sa + ia) * geo.B + beta) * geo.C + gamma;  // ib removed
    ri_buf[i] = geo.d0_is_a ? a_stat : b_stat;
    ci_buf[i] = geo.d0_is_a ? b_stat : a_stat;
    if (++gamma == geo.C) {
      gamma = 0;
      if (++ib == geo.Sb) {
        ib = 0;
        if (++beta == geo.B) {
          beta = 0;
          if (++ia == geo.Sa) {
            ia = 0;
            ++alpha;
          }
        }
      }
    }
  }
  // Gather the statistics with scalar loads (the compiler's generic tuning avoids vector
  // gathers): channels 15-26 go straight to x, rf·cf to a contiguous buffer; the loop over the
  // element's own values then vectorises.
  float mult[3][kTile];
  for (int64_t i = 0; i < len; ++i) {
    const int64_t ri = ri_buf[i], ci = ci_buf[i];
    float row[3], col[3], rrs[3], crs[3];
    for (int k = 0; k < 3; ++k) {
      row[k] = q.row[k][ri];
      col[k] = q.col[k][ci];
      rrs[k] = q.row_rs[k][ri];
      crs[k] = q.col_rs[k][ci];
      mult[k][i] = q.rf[k][ri] * q.cf[k][ci];
    }
    write_stat_channels(row, col, rrs, crs, x + i, kTile);
  }
  float* __restrict out = x;
  const float* __restrict m0 = mult[0];
  const float* __restrict m1 = mult[1];
  const float* __restrict m2 = mult[2];
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const float both[3] = {m0[i], m1[i], m2[i]};
    write_element_channels(g[i], p[i], m + 3 * i, v[i], both, both, out + i, kTile);
  }
}

// Σ x² in double with 16 independent partial sums in a fixed order: without them the sum is one
// dependency chain (floating-point addition may not be reordered), with them it vectorises.
LOZOO_HD double sum_squares(const float* __restrict x, int64_t len) {
  constexpr int kLanes = 16;
  double part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] += static_cast<double>(x[i + l]) * x[i + l];
  for (; i < len; ++i) part[0] += static_cast<double>(x[i]) * x[i];
  double sum = 0.0;
  for (int l = 0; l < kLanes; ++l) sum += part[l];
  return sum;
}

VELO_CLONES void tile_sums(const View& s, const Stats& q, int64_t t, double* out) {
  float x[kFeatures * kTile];
  const int64_t e0 = t * kTile, len = std::min(kTile, s.geo.n - e0);
  tile_features(s, q, e0, len, x);
  for (int ch = 0; ch < kFeatures; ++ch) out[ch] = sum_squares(x + ch * kTile, len);
  out[kFeatures] = sum_squares(s.p + e0, len);
}

VELO_CLONES void tile_update(const View& s, const Stats& q, const Mlp& mlp, int64_t t,
                             float* p_out,
                             float lr_mult_scale, float exp_mult, float step_mult, float lr,
                             float decay, bool has_decay) {
  float buf[2][kMaxHidden * kTile > kFeatures * kTile ? kMaxHidden * kTile : kFeatures * kTile];
  float out[2][kTile];
  const int64_t e0 = t * kTile, len = std::min(kTile, s.geo.n - e0);
  float* in = buf[0];
  tile_features(s, q, e0, len, in);
  const int layers = static_cast<int>(mlp.fan_in.size());
  for (int l = 0; l < layers; ++l) {
    const float* w = mlp.w.data() + mlp.w_off[l];
    const float* b = mlp.b.data() + mlp.b_off[l];
    const bool last = l + 1 == layers;
    const int fout = last ? 2 : mlp.fan_out[l];  // the third head is never read
    float* dst = last ? out[0] : buf[(l + 1) % 2];
    for (int o = 0; o < fout; ++o) {
      float* acc = last ? out[o] : dst + o * kTile;
      for (int64_t i = 0; i < len; ++i) acc[i] = b[o];
      for (int j = 0; j < mlp.fan_in[l]; ++j) {
        const float wj = w[j * mlp.fan_out[l] + o];
        const float* xj = in + j * kTile;
        for (int64_t i = 0; i < len; ++i) acc[i] += xj[i] * wj;
      }
      if (!last)
        for (int64_t i = 0; i < len; ++i) acc[i] = acc[i] > 0.0f ? acc[i] : 0.0f;
    }
    in = dst;
  }
  for (int64_t i = 0; i < len; ++i) {
    const float st = step(lr_mult_scale, out[0][i], out[1][i], exp_mult, step_mult);
    const float p = s.p[e0 + i];
    p_out[e0 + i] = (has_decay ? p * decay : p) - lr * st;
  }
}

void velo_mlp_step_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m,
                       const at::Tensor& v, const std::optional<at::Tensor>& r,
                       const std::optional<at::Tensor>& c,
                       const std::optional<at::Tensor>& rf,
                       const std::optional<at::Tensor>& cf,
                       const std::optional<at::Tensor>& vd, at::TensorList layers, int64_t d1,
                       int64_t d0, double lr_mult, double lr, double weight_decay,
                       double step_mult, double exp_mult) {
  int64_t h = 0;
  const Geometry geo = check_args(param, grad, m, v, r, c, rf, cf, vd, layers, d1, d0, &h);
  VELO_CHECK(param.device().is_cpu(), "the CPU kernel got a param on ", param.device());
  if (geo.n == 0) return;
  auto ptr = [](const std::optional<at::Tensor>& t) {
    return t.has_value() ? t->const_data_ptr<float>() : nullptr;
  };
  float* p = param.data_ptr<float>();
  const View s{p, grad.const_data_ptr<float>(), m.const_data_ptr<float>(),
               v.const_data_ptr<float>(), ptr(r), ptr(c), ptr(rf), ptr(cf), ptr(vd), geo};
  Stats q{};
  at::Tensor soa;  // r, rf, rsqrt(r + 1e-8), c, cf, rsqrt(c + 1e-8), each decay-major [3, n]
  if (geo.factored) {
    auto decay_major = [](const at::Tensor& t) { return t.reshape({-1, 3}).t().reshape(-1); };
    soa = at::cat({decay_major(*r), decay_major(*rf), decay_major((*r + kEpsRowCol).rsqrt()),
                   decay_major(*c), decay_major(*cf), decay_major((*c + kEpsRowCol).rsqrt())});
    const int64_t nr = geo.size_r(), nc = geo.size_c();
    const float* rows = soa.const_data_ptr<float>();
    const float* cols = rows + 9 * nr;
    for (int k = 0; k < 3; ++k) {
      q.row[k] = rows + k * nr;
      q.rf[k] = rows + (3 + k) * nr;
      q.row_rs[k] = rows + (6 + k) * nr;
      q.col[k] = cols + k * nc;
      q.cf[k] = cols + (3 + k) * nc;
      q.col_rs[k] = cols + (6 + k) * nc;
    }
  }
  const int64_t tiles = (geo.n + kTile - 1) / kTile;
  std::vector<double> partial(static_cast<size_t>(tiles) * kSums);
  at::parallel_for(0, tiles, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) tile_sums(s, q, t, partial.data() + t * kSums);
  });
  double sums[kSums] = {};
  for (int64_t t = 0; t < tiles; ++t)  // fixed order: independent of the thread count
    for (int k = 0; k < kSums; ++k) sums[k] += partial[t * kSums + k];
  const double n = static_cast<double>(geo.n);
  Mlp mlp;
  const int num = static_cast<int>(layers.size() / 2);
  for (int l = 0; l < num; ++l) {
    const at::Tensor& w = layers[2 * l];
    const int fin = static_cast<int>(w.size(0)), fout = static_cast<int>(w.size(1));
    mlp.fan_in.push_back(fin);
    mlp.fan_out.push_back(fout);
    mlp.w_off.push_back(static_cast<int>(mlp.w.size()));
    mlp.b_off.push_back(static_cast<int>(mlp.b.size()));
    const float* wp = w.const_data_ptr<float>();
    for (int j = 0; j < fin; ++j) {
      const float scale =
          l == 0 ? rsqrt_exact(kEpsNorm + static_cast<float>(sums[j] / n)) : 1.0f;
      for (int o = 0; o < fout; ++o) mlp.w.push_back(wp[j * fout + o] * scale);
    }
    const float* bp = layers[2 * l + 1].const_data_ptr<float>();
    mlp.b.insert(mlp.b.end(), bp, bp + fout);
  }
  const float param_scale = sqrtf(static_cast<float>(sums[kFeatures] / n) + kEpsParamRms);
  const float lr_mult_scale = static_cast<float>(lr_mult) * param_scale;
  const bool has_decay = weight_decay != 0.0;
  const float decay = static_cast<float>(1.0 - lr * weight_decay);
  // In place: an element's new value depends on its own old p and on the sums of sweep 1 only.
  at::parallel_for(0, tiles, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      tile_update(s, q, mlp, t, p, lr_mult_scale, static_cast<float>(exp_mult),
                  static_cast<float>(step_mult), static_cast<float>(lr), decay, has_decay);
  });
}

}  // namespace
}  // namespace lozoo::velo

TORCH_LIBRARY_FRAGMENT(lozoo, m) { m.def(lozoo::velo::kSchema); }

TORCH_LIBRARY_IMPL(lozoo, CPU, m) {
  m.impl("velo_mlp_step_", &lozoo::velo::velo_mlp_step_cpu);
}
