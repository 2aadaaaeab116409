// Per-element math of VeLO's fused step (docs/design/velo.md), shared by the CPU kernel
// (velo_cpu.cpp) and the CUDA kernel (velo_cuda.cu): the 30 features of one element, from the
// already-updated accumulators, in the channel order of the first MLP layer. Same formulas and
// the same evaluation order as lopt/velo/core.py.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "small_fc_checks.h"  // Geometry, shape_str and the shared per-element helpers

namespace lozoo::velo {

constexpr int kFeatures = 30;
constexpr int kOutputs = 3;
constexpr int kMaxHidden = 16;        // the CUDA kernel keeps one hidden layer in registers
constexpr float kGradClip = 1000.0f;  // before every accumulator and feature
constexpr float kGradFeatureClip = 0.1f;
constexpr float kEpsParamRms = 1e-9f;

// One tensor's inputs; r/c/rf/cf are null below rank 2, vd is null from rank 2 on.
struct View {
  const float* p;
  const float* g;
  const float* m;
  const float* v;
  const float* r;
  const float* c;
  const float* rf;
  const float* cf;
  const float* vd;
  Geometry geo;
};

// clamp that propagates NaN like torch.clamp
LOZOO_HD float clampf(float x, float bound) {
  return x > bound ? bound : (x < -bound ? -bound : x);
}

// What channels 11-13 and 15-29 read, per decay k (lozoo's torch core calls these ElementInputs):
// fac_g = g·g_mult, fac_m = m·m_mult, the statistics broadcast to the element and their rsqrt.
struct Inputs {
  float g_mult[3], m_mult[3], row[3], col[3], row_rs[3], col_rs[3];
};

// Rank >= 2: the element's r and c entries, the row/column factors and rsqrt(stat + 1e-8).
LOZOO_HD Inputs factored_inputs(const float* row, const float* col, const float* rf,
                                const float* cf, const float* row_rs, const float* col_rs) {
  Inputs in;
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    const float mult = rf[k] * cf[k];
    in.g_mult[k] = mult;
    in.m_mult[k] = mult;
    in.row[k] = row[k];
    in.col[k] = col[k];
    in.row_rs[k] = row_rs[k];
    in.col_rs[k] = col_rs[k];
  }
  return in;
}

// Rank <= 1: every statistic is the element's own vd; VeLO's fac_m has no epsilon.
LOZOO_HD Inputs unfactored_inputs(const float* vd) {
  Inputs in;
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    const float rs = stat_rsqrt(vd[k]);
    in.g_mult[k] = safe_rsqrt(vd[k] + kEpsRsqrt);
    in.m_mult[k] = rsqrt_exact(vd[k]);
    in.row[k] = vd[k];
    in.col[k] = vd[k];
    in.row_rs[k] = rs;
    in.col_rs[k] = rs;
  }
  return in;
}

// The channels that read the element's own values: 0-14 and 27-29 (fac_g = g·g_mult,
// fac_m = m·m_mult per decay k).
LOZOO_HD void write_element_channels(float g_raw, float p, const float* m, float v,
                                     const float* g_mult, const float* m_mult, float* x,
                                     int64_t stride) {
  const float g = clampf(g_raw, kGradClip);
  const float rv = rsqrt_exact(v + kEpsRms);
  x[0 * stride] = g;
  x[1 * stride] = clampf(g, kGradFeatureClip);
  x[2 * stride] = p;
  x[6 * stride] = v;
  x[10 * stride] = rv;
  x[14 * stride] = g * rv;
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    x[(3 + k) * stride] = m[k];
    x[(7 + k) * stride] = m[k] * rv;
    x[(11 + k) * stride] = g * g_mult[k];
    x[(27 + k) * stride] = m[k] * m_mult[k];
  }
}

// Channels 15-26: the statistics broadcast to the element and their rsqrt.
LOZOO_HD void write_stat_channels(const float* row, const float* col, const float* row_rs,
                                  const float* col_rs, float* x, int64_t stride) {
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    x[(15 + k) * stride] = row[k];
    x[(18 + k) * stride] = col[k];
    x[(21 + k) * stride] = row_rs[k];
    x[(24 + k) * stride] = col_rs[k];
  }
}

// The 30 features of one element, written to x[ch * stride], in the first layer's row order.
LOZOO_HD void write_features(float g_raw, float p, const float* m, float v, const Inputs& in,
                             float* x, int64_t stride) {
  write_element_channels(g_raw, p, m, v, in.g_mult, in.m_mult, x, stride);
  write_stat_channels(in.row, in.col, in.row_rs, in.col_rs, x, stride);
}

// The 30 features of element e, index arithmetic per element (the CUDA kernel; the CPU kernel
// walks tiles incrementally instead).
LOZOO_HD void features(const View& s, int64_t e, float* x, int64_t stride) {
  Inputs in;
  if (s.geo.factored) {
    int64_t ri, ci;
    s.geo.row_col_index(e, ri, ci);
    float row_rs[3], col_rs[3];
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      row_rs[k] = stat_rsqrt(s.r[3 * ri + k]);
      col_rs[k] = stat_rsqrt(s.c[3 * ci + k]);
    }
    in = factored_inputs(s.r + 3 * ri, s.c + 3 * ci, s.rf + 3 * ri, s.cf + 3 * ci, row_rs,
                         col_rs);
  } else {
    in = unfactored_inputs(s.vd + 3 * e);
  }
  write_features(s.g[e], s.p[e], s.m + 3 * e, s.v[e], in, x, stride);
}

// step = lr_mult · rms(p) · d · exp(exp_mult · m) · step_mult, left to right like the torch core.
LOZOO_HD float step(float lr_mult_scale, float d, float mag, float exp_mult, float step_mult) {
  return lr_mult_scale * d * exp_vec(exp_mult * mag) * step_mult;
}

// -- host-side argument checks, shared by both bindings and mirrored by lopt/velo/kernels.py --
constexpr const char* kSchema =
    "velo_mlp_step_(Tensor(a!) param, Tensor grad, Tensor m, Tensor v, Tensor? r, Tensor? c, "
    "Tensor? row_factor, Tensor? col_factor, Tensor? vd, Tensor[] layers, int d1, int d0, "
    "float lr_mult, float lr, float weight_decay, float step_mult, float exp_mult) -> ()";

#define VELO_CHECK(cond, ...) TORCH_CHECK(cond, "lozoo::velo_mlp_step_: ", __VA_ARGS__)

inline void check_f32(const at::Tensor& t, const char* name, const std::vector<int64_t>& want,
                      const at::Tensor& param) {
  VELO_CHECK(t.device() == param.device() && t.scalar_type() == at::kFloat && t.is_contiguous(),
             name, " must be a contiguous float32 tensor on param's device, got ",
             t.scalar_type(), " on ", t.device());
  VELO_CHECK(t.sizes().vec() == want, name, " has shape ", shape_str(t.sizes()), ", expected ",
             shape_str(want));
}

// Validates everything and returns the geometry; *hidden receives the MLP width.
inline Geometry check_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m,
                           const at::Tensor& v, const std::optional<at::Tensor>& r,
                           const std::optional<at::Tensor>& c,
                           const std::optional<at::Tensor>& rf,
                           const std::optional<at::Tensor>& cf,
                           const std::optional<at::Tensor>& vd, at::TensorList layers,
                           int64_t d1, int64_t d0, int64_t* hidden) {
  VELO_CHECK(param.scalar_type() == at::kFloat && param.is_contiguous(),
             "param must be a contiguous float32 tensor (the optimizer steps a float32 copy of "
             "low-precision parameters), got ", param.scalar_type());
  std::vector<int64_t> shape = param.sizes().vec();
  if (shape.empty()) shape = {1};
  const int64_t rank = static_cast<int64_t>(shape.size());
  check_f32(grad, "grad", param.sizes().vec(), param);
  check_f32(m, "m", with_last(shape, 3), param);
  check_f32(v, "v", with_last(shape, 1), param);
  if (rank >= 2) {
    VELO_CHECK(d0 >= 0 && d1 >= 0 && d0 < rank && d1 < rank && d0 != d1, "(d1, d0) = (", d1,
               ", ", d0, ") are not two distinct axes of a rank-", rank, " param");
    VELO_CHECK(r && c && rf && cf && !vd, "a rank-", rank,
               " param needs r, c, row_factor and col_factor, and no vd");
    check_f32(*r, "r", without_axis(shape, d0), param);
    check_f32(*c, "c", without_axis(shape, d1), param);
    check_f32(*rf, "row_factor", without_axis(shape, d0), param);
    check_f32(*cf, "col_factor", without_axis(shape, d1), param);
  } else {
    VELO_CHECK(d0 == -1 && d1 == -1 && vd && !r && !c && !rf && !cf, "a rank-", param.dim(),
               " param needs vd only, and d1 = d0 = -1");
    check_f32(*vd, "vd", with_last(shape, 3), param);
  }
  const int64_t nl = static_cast<int64_t>(layers.size());
  VELO_CHECK(nl >= 4 && nl % 2 == 0, "layers must be [w0, b0, ..., wL, bL] with at least two "
             "weight matrices, got ", nl, " tensors");
  const int64_t h = layers[0].dim() == 2 ? layers[0].size(1) : -1;
  VELO_CHECK(h >= 1 && h <= kMaxHidden, "layers[0] (w0) must have shape (30, h) with "
             "1 <= h <= ", kMaxHidden, ", got ", shape_str(layers[0].sizes()));
  for (int64_t i = 0; i < nl; ++i) {
    const int64_t k = i / 2;
    const int64_t fan_in = k == 0 ? kFeatures : h;
    const int64_t fan_out = 2 * k + 2 == nl ? kOutputs : h;
    const std::vector<int64_t> want =
        i % 2 == 0 ? std::vector<int64_t>{fan_in, fan_out} : std::vector<int64_t>{fan_out};
    check_f32(layers[i], i % 2 ? "a bias of layers" : "a weight of layers", want, param);
  }
  *hidden = h;
  return make_geometry(shape.data(), rank, rank >= 2 ? d1 : -1, rank >= 2 ? d0 : -1);
}

}  // namespace lozoo::velo
