// Per-element math of small_fc_lopt (docs/design/small_fc_lopt.md §4-§6), shared verbatim by the
// CPU kernel (small_fc_cpu.cpp) and the CUDA kernel (small_fc_cuda.cu) so both compute exactly the
// same formulas, in the same order, as lopt/core.py.
//
// Features are written to `x[ch * stride]`: the CPU kernel fills a structure-of-arrays block
// (stride = block size, so the MLP loops vectorise over elements), the CUDA kernel a per-thread
// array (stride 1, fully unrolled into registers).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define LOZOO_HD __host__ __device__ __forceinline__
#else
#define LOZOO_HD inline __attribute__((always_inline))
#endif

namespace lozoo {

constexpr int kElemFeatures = 28;  // channels 0-27, normalised per tensor
constexpr int kTimeFeatures = 11;  // channels 28-38, folded into the first bias
constexpr int kFeatures = kElemFeatures + kTimeFeatures;
constexpr int kNumDecays = 7;  // packed as (β_m0, β_m1, β_m2, β_rms, β_f0, β_f1, β_f2)

// Epsilons of the reference, named after what they guard (same names as lopt/core.py).
constexpr float kEpsGsq = 1e-30f;     // g² + eps in the factored / non-factored accumulators
constexpr float kEpsRsqrt = 1e-9f;    // floor of safe_rsqrt and the row-mean guard
constexpr float kEpsRms = 1e-6f;      // rsqrt(v + eps) and the 1-D momentum factor
constexpr float kEpsRowCol = 1e-8f;   // rsqrt(row/col + eps) features
constexpr float kEpsNorm = 1e-5f;     // per-channel feature normalisation

// torch's CPU rsqrt is 1/sqrt (two roundings); CUDA's rsqrtf is approximate, so neither kernel
// uses a hardware reciprocal-sqrt estimate.
LOZOO_HD float rsqrt_exact(float x) { return 1.0f / sqrtf(x); }

// clamp_min propagates NaN; fmaxf would not, hence the explicit comparison.
LOZOO_HD float safe_rsqrt(float x) { return rsqrt_exact(x < kEpsRsqrt ? kEpsRsqrt : x); }

// β·old + (1 − β)·x with (1 − β) precomputed in float, as torch computes `(1 - beta)`.
LOZOO_HD float ema(float beta, float one_minus_beta, float old, float x) {
  return beta * old + one_minus_beta * x;
}

LOZOO_HD float squared_grad(float g) { return g * g + kEpsGsq; }

// Adafactor factors (design §4.2): r is normalised by its mean over axis d1 only; c is not.
LOZOO_HD float row_factor(float r, float r_mean) { return safe_rsqrt(r / (r_mean + kEpsRsqrt)); }
LOZOO_HD float col_factor(float c) { return safe_rsqrt(c); }
LOZOO_HD float stat_rsqrt(float s) { return rsqrt_exact(s + kEpsRowCol); }

// tanh(t/τ_j − 1) for the pre-increment counter t (design §5.3).
LOZOO_HD float time_feature(float t, int j) {
  const float tau[kTimeFeatures] = {1.f,   3.f,   10.f,   30.f,   100.f,  300.f,
                                    1e3f,  3e3f,  1e4f,   3e4f,   1e5f};
  return tanhf(t / tau[j] - 1.0f);
}

// Channels 0-9: g, p, m_k, v, m_k·rsqrt(v + 1e-6), rsqrt(v + 1e-6).
LOZOO_HD void common_features(float g, float p, const float* m, float v, float* x,
                              int64_t stride) {
  const float rv = rsqrt_exact(v + kEpsRms);
  x[0 * stride] = g;
  x[1 * stride] = p;
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    x[(2 + k) * stride] = m[k];
    x[(6 + k) * stride] = m[k] * rv;
  }
  x[5 * stride] = v;
  x[9 * stride] = rv;
}

// Channels 10-12 and 25-27 for rank ≥ 2 (design §5.1): `mult[k]` = row_factor·col_factor.
LOZOO_HD void factored_element_features(float g, const float* m, const float* mult, float* x,
                                        int64_t stride) {
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    x[(10 + k) * stride] = g * mult[k];
    x[(25 + k) * stride] = m[k] * mult[k];
  }
}

// Channels 13-24 for rank ≥ 2: the statistics themselves, constant along d0 (row) / d1 (col).
LOZOO_HD void factored_stat_features(const float* row, const float* col, const float* row_rs,
                                     const float* col_rs, float* x, int64_t stride) {
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    x[(13 + k) * stride] = row[k];
    x[(16 + k) * stride] = col[k];
    x[(19 + k) * stride] = row_rs[k];
    x[(22 + k) * stride] = col_rs[k];
  }
}

// Channels 10-27 for rank ≥ 2.
LOZOO_HD void factored_features(float g, const float* m, const float* mult, const float* row,
                                const float* col, const float* row_rs, const float* col_rs,
                                float* x, int64_t stride) {
  factored_element_features(g, m, mult, x, stride);
  factored_stat_features(row, col, row_rs, col_rs, x, stride);
}

// Channels 10-27 for rank 0/1 (design §5.2); trap T3: the momentum factor uses eps 1e-6, no clamp.
LOZOO_HD void unfactored_features(float g, const float* m, const float* vd, float* x,
                                  int64_t stride) {
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    const float rs = stat_rsqrt(vd[k]);
    x[(10 + k) * stride] = g * safe_rsqrt(vd[k] + kEpsRsqrt);
    x[(13 + k) * stride] = vd[k];
    x[(16 + k) * stride] = vd[k];
    x[(19 + k) * stride] = rs;
    x[(22 + k) * stride] = rs;
    x[(25 + k) * stride] = m[k] * rsqrt_exact(vd[k] + kEpsRms);
  }
}

// expf that the host compiler can vectorise (libm's expf is an opaque call): Cody-Waite range
// reduction, the classic degree-6 minimax polynomial for e^r on |r| ≤ ln2/2 (≈1 ulp), and 2^k
// applied as two factors so overflow to inf and underflow to 0 stay exact. NaN propagates.
LOZOO_HD float exp_vec(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  x = x > 89.0f ? 89.0f : x;     // e^89 overflows anyway; keeps k within ±150
  x = x < -104.0f ? -104.0f : x;  // e^-104 underflows to 0 anyway
  const float shifter = 12582912.0f;  // 1.5·2^23: adding it rounds to the nearest integer
  const float k = (x * 1.44269504088896341f + shifter) - shifter;
  const float r = (x - k * 0.693359375f) + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = (p * r) * r + r + 1.0f;
  const int32_t ki = static_cast<int32_t>(k);
  const int32_t k1 = ki / 2, k2 = ki - k1;
  const int32_t b1 = (k1 + 127) << 23, b2 = (k2 + 127) << 23;
  float s1, s2;
  memcpy(&s1, &b1, sizeof s1);
  memcpy(&s2, &b2, sizeof s2);
  return er * s1 * s2;
#endif
}

// step = step_mult · d · exp(exp_mult · m) (design §6), evaluated left to right like lopt/core.py.
LOZOO_HD float learned_step(float d, float mag, float step_mult, float exp_mult) {
  return step_mult * d * exp_vec(exp_mult * mag);
}

// p ← p·(1 − lr·wd) − lr·step (decoupled weight decay, lopt/optimizer.py); `decay` = 1 − lr·wd.
LOZOO_HD float apply_step(float p, float step, float lr, float decay, bool has_decay) {
  return (has_decay ? p * decay : p) - lr * step;
}

}  // namespace lozoo
