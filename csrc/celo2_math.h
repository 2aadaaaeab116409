// Per-element math of the Celo2 learned rule shared by the CPU kernel (celo2_cpu.cpp) and the
// CUDA kernel (celo2_cuda.cu), so both compute the same features in the same order
// (design: docs/design/celo2.md). Everything is float32.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#if defined(__CUDACC__)
#define LOZOO_C2_HD __host__ __device__ __forceinline__
#else
#include <cmath>
#define LOZOO_C2_HD inline __attribute__((always_inline))
#endif

namespace lozoo::celo2 {

constexpr int kChannels = 30;
constexpr int kChannels1d = 15;
constexpr int kHidden = 8;
constexpr float kGradClip = 1000.0f;
constexpr float kFeatureClip = 0.1f;
constexpr float kEpsSafe = 1e-9f;
constexpr float kEpsRsqrt = 1e-8f;
constexpr float kBetaV = 0.95f;

// The momentum decays 0.9, 0.99, 0.999 (a function, so host and device code share it).
LOZOO_C2_HD float beta_m(int k) { return k == 0 ? 0.9f : (k == 1 ? 0.99f : 0.999f); }

// m_k ← β_k·m_k + (1 − β_k)·ĝ and v ← 0.95·v + 0.05·ĝ² in place (ĝ already clipped), with the
// (1 − β) factors rounded to float first, as torch computes them.
LOZOO_C2_HD void advance_moments(float g, float* m, float* v) {
  *v = kBetaV * *v + (1.0f - kBetaV) * (g * g);
  for (int k = 0; k < 3; ++k) m[k] = beta_m(k) * m[k] + (1.0f - beta_m(k)) * g;
}

LOZOO_C2_HD float clampf(float x, float lo, float hi) {
  // NaN passes through, as torch.clamp does. Two plain selects (not a nested conditional) so the
  // CPU loops over elements stay branch-free and vectorise.
  const float y = x < lo ? lo : x;
  return y > hi ? hi : y;
}

LOZOO_C2_HD float rsqrt_f(float x) { return 1.0f / sqrtf(x); }

LOZOO_C2_HD float safe_rsqrt_f(float x) {
  const float y = x < kEpsSafe ? kEpsSafe : x;
  return rsqrt_f(y);
}

// Row/column statistics per k: [stat_k (3), rsqrt(stat_k + 1e-8) (3), factor_k (3)], where the
// factor is ρ_k for rows and κ_k for columns.
constexpr int kStatWidth = 9;

// The 30 (or 15) raw channels of one element in w0's row order. `row`/`col` point at the
// element's 9 row/column statistics (rank >= 2); `diag` at its 3 diagonal second moments
// (rank <= 1, then row/col are null).
LOZOO_C2_HD void features(float g_raw, float p, const float* m, float v, const float* row,
                          const float* col, const float* diag, float* x) {
  const float g = clampf(g_raw, -kGradClip, kGradClip);
  const float r = rsqrt_f(v + kEpsRsqrt);
  x[0] = g;
  x[1] = clampf(g, -kFeatureClip, kFeatureClip);
  x[2] = p;
  x[6] = v;
  x[10] = r;
  x[14] = g * r;
  for (int k = 0; k < 3; ++k) {
    x[3 + k] = m[k];
    x[7 + k] = m[k] * r;
  }
  if (row != nullptr) {
    for (int k = 0; k < 3; ++k) {
      const float both = row[6 + k] * col[6 + k];
      x[11 + k] = g * both;
      x[15 + k] = row[k];
      x[18 + k] = col[k];
      x[21 + k] = row[3 + k];
      x[24 + k] = col[3 + k];
      x[27 + k] = m[k] * both;
    }
  } else {
    for (int k = 0; k < 3; ++k) x[11 + k] = g * safe_rsqrt_f(diag[k] + kEpsSafe);
  }
}

// Output 0 of the 30 → 8 → 8 → 3 ReLU MLP; w0 has the normalisation folded in (channels × 8),
// w2c is column 0 of w2 and b2c = b2[0].
LOZOO_C2_HD float mlp_direction(const float* x, int channels, const float* w0, const float* b0,
                                const float* w1, const float* b1, const float* w2c, float b2c) {
  float h1[kHidden];
  for (int o = 0; o < kHidden; ++o) h1[o] = b0[o];
  for (int c = 0; c < channels; ++c)
    for (int o = 0; o < kHidden; ++o) h1[o] += x[c] * w0[c * kHidden + o];
  float out = b2c;
  for (int o = 0; o < kHidden; ++o) {
    float h2 = b1[o];
    for (int i = 0; i < kHidden; ++i) h2 += (h1[i] > 0.0f ? h1[i] : 0.0f) * w1[i * kHidden + o];
    out += (h2 > 0.0f ? h2 : 0.0f) * w2c[o];
  }
  return out;
}

// -- argument checks of celo2_direction (host code; the same on both devices) ------------------

inline void check_direction_tensor(const at::Tensor& t, const char* name, at::IntArrayRef shape,
                                   bool cuda) {
  if (cuda) {
    TORCH_CHECK(t.is_cuda(), "celo2_direction: ", name, " must be on a CUDA device, got ",
                t.device());
  } else {
    TORCH_CHECK(t.device().is_cpu(), "celo2_direction: ", name, " must be on the CPU, got ",
                t.device());
  }
  TORCH_CHECK(t.scalar_type() == at::kFloat, "celo2_direction: ", name,
              " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "celo2_direction: ", name, " must be contiguous");
  TORCH_CHECK(t.sizes() == shape, "celo2_direction: ", name, " has shape ", t.sizes(),
              ", expected ", shape);
}

// Every argument on the kernel's device (CUDA or CPU), float32, contiguous and of the shape the
// (L, R, C) view of param implies. Returns whether the statistics are factored (rank >= 2).
inline bool check_direction_args(const at::Tensor& grad, const at::Tensor& param,
                                 const at::Tensor& m, const at::Tensor& v,
                                 const std::optional<at::Tensor>& row_stats,
                                 const std::optional<at::Tensor>& col_stats,
                                 const std::optional<at::Tensor>& v_diag, const at::Tensor& w0,
                                 const at::Tensor& b0, const at::Tensor& w1,
                                 const at::Tensor& b1, const at::Tensor& w2,
                                 const at::Tensor& b2, bool row_by_i, bool cuda) {
  TORCH_CHECK(param.dim() == 3, "celo2_direction: param must be viewed as (L, R, C), got rank ",
              param.dim());
  const int64_t L = param.size(0), R = param.size(1), C = param.size(2);
  check_direction_tensor(param, "param", {L, R, C}, cuda);
  check_direction_tensor(grad, "grad", {L, R, C}, cuda);
  check_direction_tensor(m, "m", {L, R, C, 3}, cuda);
  check_direction_tensor(v, "v", {L, R, C}, cuda);
  const bool factored = row_stats.has_value();
  TORCH_CHECK(factored == col_stats.has_value() && factored != v_diag.has_value(),
              "celo2_direction: pass row_stats and col_stats (rank >= 2) or v_diag (rank <= 1)");
  if (factored) {
    check_direction_tensor(*row_stats, "row_stats", {L, kStatWidth, row_by_i ? R : C}, cuda);
    check_direction_tensor(*col_stats, "col_stats", {L, kStatWidth, row_by_i ? C : R}, cuda);
  } else {
    TORCH_CHECK(L == 1 && R == 1, "celo2_direction: v_diag needs param viewed as (1, 1, N)");
    check_direction_tensor(*v_diag, "v_diag", {L, R, C, 3}, cuda);
  }
  check_direction_tensor(w0, "w0", {kChannels, kHidden}, cuda);
  check_direction_tensor(b0, "b0", {kHidden}, cuda);
  check_direction_tensor(w1, "w1", {kHidden, kHidden}, cuda);
  check_direction_tensor(b1, "b1", {kHidden}, cuda);
  check_direction_tensor(w2, "w2", {kHidden, 3}, cuda);
  check_direction_tensor(b2, "b2", {3}, cuda);
  return factored;
}

}  // namespace lozoo::celo2
