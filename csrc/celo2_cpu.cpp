// CPU kernel of lozoo::celo2_direction: the Celo2 features and MLP of one tensor in two sweeps,
// never materialising the n×30 feature matrix (design: docs/design/celo2.md).
//   A. Per chunk of rows: build the features of blocks of elements, sum their squares per channel.
//      Chunks never span two slices, and the per-slice sums add the chunks in a fixed order, so
//      results do not depend on the thread count.
//   B. Fold each slice's per-channel normalisation into its copy of w0 (exact up to rounding),
//      then per block: features → MLP → direction.
// Sweep A also advances the momenta m and the second moment v in place (they are arguments the
// op mutates). The caller has updated the factored / diagonal second moments and reduced the
// row/column statistics (they need a reduction over the whole tensor first); it runs
// Newton–Schulz and the output normalisation on the result (batched GEMMs in torch).
// Blocks are structure-of-arrays so the compiler vectorises across elements; the block functions
// are compiled for AVX-512, AVX2+FMA and baseline x86-64 and picked at load time (target_clones).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "celo2_math.h"

namespace lozoo::celo2 {
namespace {

constexpr int kBlock = 16;

struct Slice {
  const float* g;     // (R, C)
  const float* p;     // (R, C)
  float* m;           // (R, C, 3), updated in place by sweep A
  float* v;           // (R, C), updated in place by sweep A
  const float* row;   // (KR, 9) or null
  const float* col;   // (KC, 9) or null
  const float* diag;  // (R·C, 3) or null (rank <= 1)
  int64_t cols;
  int64_t kr, kc;     // lengths of the row / column statistics (stride between statistics)
  bool row_by_i;      // row statistics indexed by the row index i (else by j); columns the other
};

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LOZOO_C2_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define LOZOO_C2_CLONES
#endif

// Features of elements [j0, j0 + n) of row i, structure-of-arrays: x[c * kBlock + e]. The
// variant (factored or diagonal; row statistics indexed by i or by j) is a template parameter
// so the element loop has no branches and vectorises.
// With kUpdate (sweep A) the momenta and the second moment are first advanced in place with ĝ;
// sweep B then reads the updated values.
template <bool kFactored, bool kRowByI, bool kUpdate>
inline __attribute__((always_inline)) void block_features(const Slice& s, int64_t i, int64_t j0,
                                                          int n, float* __restrict x) {
  const int64_t base = i * s.cols + j0;
  const float* __restrict gp = s.g + base;
  const float* __restrict pp = s.p + base;
  float* __restrict vp = s.v + base;
  float* __restrict mp = s.m + 3 * base;
  for (int e = 0; e < n; ++e) {
    const float g = clampf(gp[e], -kGradClip, kGradClip);
    if constexpr (kUpdate) advance_moments(g, mp + 3 * e, vp + e);
    const float v = vp[e];
    const float r = 1.0f / std::sqrt(v + kEpsRsqrt);
    x[0 * kBlock + e] = g;
    x[1 * kBlock + e] = clampf(g, -kFeatureClip, kFeatureClip);
    x[2 * kBlock + e] = pp[e];
    x[6 * kBlock + e] = v;
    x[10 * kBlock + e] = r;
    x[14 * kBlock + e] = g * r;
    for (int k = 0; k < 3; ++k) {
      const float mk = mp[3 * e + k];
      x[(3 + k) * kBlock + e] = mk;
      x[(7 + k) * kBlock + e] = mk * r;
    }
  }
  if constexpr (kFactored) {
    // Statistics are stored statistic-major, (9, K) per slice: the one indexed by j is read
    // contiguously across the block, the one indexed by i is a broadcast.
    const int64_t i_idx = i, j_idx = j0;
    const float* __restrict rowp = s.row + (kRowByI ? i_idx : j_idx);
    const float* __restrict colp = s.col + (kRowByI ? j_idx : i_idx);
    for (int q = 0; q < kStatWidth; ++q) {
      const float* __restrict rq = rowp + q * s.kr;
      const float* __restrict cq = colp + q * s.kc;
      if (q < 6) {
        const int row_ch = q < 3 ? 15 + q : 21 + (q - 3);
        const int col_ch = q < 3 ? 18 + q : 24 + (q - 3);
        for (int e = 0; e < n; ++e) {
          x[row_ch * kBlock + e] = rq[kRowByI ? 0 : e];
          x[col_ch * kBlock + e] = cq[kRowByI ? e : 0];
        }
      } else {
        const int k = q - 6;
        for (int e = 0; e < n; ++e) {
          const float both = rq[kRowByI ? 0 : e] * cq[kRowByI ? e : 0];
          x[(11 + k) * kBlock + e] = x[0 * kBlock + e] * both;
          x[(27 + k) * kBlock + e] = x[(3 + k) * kBlock + e] * both;
        }
      }
    }
  } else {
    const float* __restrict d = s.diag + 3 * base;
    for (int e = 0; e < n; ++e) {
      const float g = x[0 * kBlock + e];
      for (int k = 0; k < 3; ++k) x[(11 + k) * kBlock + e] = g * safe_rsqrt_f(d[3 * e + k] + kEpsSafe);
    }
  }
}

// Sweep A for rows [i0, i1): per-channel sums of squares into sums[channels].
template <bool kFactored, bool kRowByI>
inline __attribute__((always_inline)) void sum_squares_t(const Slice& s, int64_t i0, int64_t i1,
                                                         double* sums) {
  constexpr int channels = kFactored ? kChannels : kChannels1d;
  alignas(64) float x[kChannels * kBlock];
  for (int c = 0; c < channels; ++c) sums[c] = 0.0;
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t j0 = 0; j0 < s.cols; j0 += kBlock) {
      const int n = static_cast<int>(std::min<int64_t>(kBlock, s.cols - j0));
      block_features<kFactored, kRowByI, true>(s, i, j0, n, x);
      for (int c = 0; c < channels; ++c) {
        float acc = 0.0f;
        for (int e = 0; e < n; ++e) acc += x[c * kBlock + e] * x[c * kBlock + e];
        sums[c] += acc;
      }
    }
  }
}

struct Mlp {
  const float* w0;  // (channels, 8), normalisation folded in
  const float* b0;
  const float* w1;  // (8, 8)
  const float* b1;
  const float* w2;  // (8, 3): column 0 is read
  float b2;
};

// Sweep B for rows [i0, i1): the MLP's direction output into out (R, C).
template <bool kFactored, bool kRowByI>
inline __attribute__((always_inline)) void directions_t(const Slice& s, const Mlp& net, int64_t i0,
                                                        int64_t i1, float* out) {
  constexpr int channels = kFactored ? kChannels : kChannels1d;
  alignas(64) float x[kChannels * kBlock];
  alignas(64) float h1[kHidden * kBlock];
  alignas(64) float acc[kBlock];
  alignas(64) float h2[kBlock];
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t j0 = 0; j0 < s.cols; j0 += kBlock) {
      const int n = static_cast<int>(std::min<int64_t>(kBlock, s.cols - j0));
      block_features<kFactored, kRowByI, false>(s, i, j0, n, x);
      for (int c = 0; c < channels; ++c)  // keep the tail lanes finite
        for (int e = n; e < kBlock; ++e) x[c * kBlock + e] = 0.0f;
      for (int o = 0; o < kHidden; ++o)
        for (int e = 0; e < kBlock; ++e) h1[o * kBlock + e] = net.b0[o];
      for (int c = 0; c < channels; ++c)
        for (int o = 0; o < kHidden; ++o) {
          const float w = net.w0[c * kHidden + o];
          for (int e = 0; e < kBlock; ++e) h1[o * kBlock + e] += x[c * kBlock + e] * w;
        }
      for (int k = 0; k < kHidden; ++k)
        for (int e = 0; e < kBlock; ++e) h1[k * kBlock + e] = std::max(h1[k * kBlock + e], 0.0f);
      for (int e = 0; e < kBlock; ++e) acc[e] = net.b2;
      for (int o = 0; o < kHidden; ++o) {
        for (int e = 0; e < kBlock; ++e) h2[e] = net.b1[o];
        for (int k = 0; k < kHidden; ++k) {
          const float w = net.w1[k * kHidden + o];
          for (int e = 0; e < kBlock; ++e) h2[e] += h1[k * kBlock + e] * w;
        }
        const float w = net.w2[o * 3];
        for (int e = 0; e < kBlock; ++e) acc[e] += std::max(h2[e], 0.0f) * w;
      }
      float* dst = out + i * s.cols + j0;
      for (int e = 0; e < n; ++e) dst[e] = acc[e];
    }
  }
}

// One entry point per variant and sweep, each compiled for every instruction set.
#define LOZOO_C2_VARIANT(NAME, F, R)                                                        \
  LOZOO_C2_CLONES void sum_squares_##NAME(const Slice& s, int64_t i0, int64_t i1,          \
                                          double* sums) {                                 \
    sum_squares_t<F, R>(s, i0, i1, sums);                                                   \
  }                                                                                         \
  LOZOO_C2_CLONES void directions_##NAME(const Slice& s, const Mlp& net, int64_t i0,       \
                                         int64_t i1, float* out) {                         \
    directions_t<F, R>(s, net, i0, i1, out);                                                \
  }
LOZOO_C2_VARIANT(rows_i, true, true)
LOZOO_C2_VARIANT(rows_j, true, false)
LOZOO_C2_VARIANT(diag, false, false)

void sum_squares(const Slice& s, int64_t i0, int64_t i1, double* sums) {
  if (s.row == nullptr) return sum_squares_diag(s, i0, i1, sums);
  if (s.row_by_i) return sum_squares_rows_i(s, i0, i1, sums);
  return sum_squares_rows_j(s, i0, i1, sums);
}

void directions(const Slice& s, const Mlp& net, int64_t i0, int64_t i1, float* out) {
  if (s.row == nullptr) return directions_diag(s, net, i0, i1, out);
  if (s.row_by_i) return directions_rows_i(s, net, i0, i1, out);
  return directions_rows_j(s, net, i0, i1, out);
}

}  // namespace

// grad, param (L, R, C); m (L, R, C, 3); v (L, R, C); row_stats (L, 9, KR) and col_stats
// (L, 9, KC) for rank >= 2 (statistic-major: [stat_k, rsqrt(stat_k + 1e-8), factor_k] for k =
// 0..2, then the index along the row/column), or v_diag (L, R, C, 3) for rank <= 1 (L = R = 1).
at::Tensor celo2_direction_cpu(const at::Tensor& grad, const at::Tensor& param,
                               const at::Tensor& m, const at::Tensor& v,
                               const std::optional<at::Tensor>& row_stats,
                               const std::optional<at::Tensor>& col_stats,
                               const std::optional<at::Tensor>& v_diag, const at::Tensor& w0,
                               const at::Tensor& b0, const at::Tensor& w1, const at::Tensor& b1,
                               const at::Tensor& w2, const at::Tensor& b2, bool row_by_i) {
  const bool factored = check_direction_args(grad, param, m, v, row_stats, col_stats, v_diag, w0,
                                             b0, w1, b1, w2, b2, row_by_i, /*cuda=*/false);
  const int64_t L = param.size(0), R = param.size(1), C = param.size(2);
  const int channels = factored ? kChannels : kChannels1d;
  at::Tensor out = at::empty({L, R, C}, param.options());
  if (L * R * C == 0) return out;

  // Chunks of whole rows, about 16K elements each, never spanning two slices.
  const int64_t rows_per_chunk = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
  const int64_t chunks_per_slice = (R + rows_per_chunk - 1) / rows_per_chunk;
  const int64_t chunks = L * chunks_per_slice;
  auto slice_at = [&](int64_t l) {
    Slice s;
    s.g = grad.data_ptr<float>() + l * R * C;
    s.p = param.data_ptr<float>() + l * R * C;
    s.m = m.data_ptr<float>() + l * R * C * 3;  // NOLINT: mutated in place (schema m(a!))
    s.v = v.data_ptr<float>() + l * R * C;
    s.cols = C;
    s.kr = row_by_i ? R : C;
    s.kc = row_by_i ? C : R;
    s.row_by_i = row_by_i;
    if (factored) {
      s.row = row_stats->data_ptr<float>() + l * kStatWidth * s.kr;
      s.col = col_stats->data_ptr<float>() + l * kStatWidth * s.kc;
      s.diag = nullptr;
    } else {
      s.row = s.col = nullptr;
      s.diag = v_diag->data_ptr<float>();
    }
    return s;
  };

  std::vector<double> partial(chunks * kChannels, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      const int64_t l = chunk / chunks_per_slice;
      const int64_t i0 = (chunk % chunks_per_slice) * rows_per_chunk;
      sum_squares(slice_at(l), i0, std::min(R, i0 + rows_per_chunk),
                  partial.data() + chunk * kChannels);
    }
  });

  // Per slice: w0' = rsqrt(1e-9 + mean(x²)) · w0, row by row.
  std::vector<float> w0s(L * kChannels * kHidden, 0.0f);
  const float* w0p = w0.data_ptr<float>();
  for (int64_t l = 0; l < L; ++l) {
    for (int c = 0; c < channels; ++c) {
      double sum = 0.0;
      for (int64_t k = 0; k < chunks_per_slice; ++k)
        sum += partial[(l * chunks_per_slice + k) * kChannels + c];
      const float mean = static_cast<float>(sum / static_cast<double>(R * C));
      const float scale = 1.0f / std::sqrt(mean + kEpsSafe);
      for (int o = 0; o < kHidden; ++o)
        w0s[(l * kChannels + c) * kHidden + o] = scale * w0p[c * kHidden + o];
    }
  }

  float* outp = out.data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      const int64_t l = chunk / chunks_per_slice;
      const int64_t i0 = (chunk % chunks_per_slice) * rows_per_chunk;
      const Mlp net{w0s.data() + l * kChannels * kHidden, b0.data_ptr<float>(),
                    w1.data_ptr<float>(), b1.data_ptr<float>(), w2.data_ptr<float>(),
                    b2.data_ptr<float>()[0]};
      directions(slice_at(l), net, i0, std::min(R, i0 + rows_per_chunk), outp + l * R * C);
    }
  });
  return out;
}

}  // namespace lozoo::celo2

TORCH_LIBRARY_FRAGMENT(lozoo, m) {
  m.def(
      "celo2_direction(Tensor grad, Tensor param, Tensor(a!) m, Tensor(b!) v, Tensor? row_stats, "
      "Tensor? col_stats, Tensor? v_diag, Tensor w0, Tensor b0, Tensor w1, Tensor b1, "
      "Tensor w2, Tensor b2, bool row_by_i) -> Tensor");
}

TORCH_LIBRARY_IMPL(lozoo, CPU, m) {
  m.impl("celo2_direction", &lozoo::celo2::celo2_direction_cpu);
}
