// Index geometry of the factored statistics for a tensor of any rank (docs/design/small_fc_lopt.md §4.2, trap T2).
//
// With a < b the two factored axes (d0 and d1 in either order), the tensor is viewed as the 5-D
// row-major array [A, Sa, B, Sb, C]: A = prod(S[:a]), Sa = S[a], B = prod(S[a+1:b]), Sb = S[b],
// C = prod(S[b+1:]). A statistic with one axis removed keeps the others in order, so
//   the "a-stat" (axis a removed) is [A, B, Sb, C] and the "b-stat" (axis b removed) [A, Sa, B, C].
// r removes d0 and c removes d1, so r is the a-stat when d0 < d1 and the b-stat otherwise; this
// is exactly torch's `gs.mean(d0)` / `gs.mean(d1)` layout, for every rank.
#pragma once

#include <cstdint>

#include "small_fc_math.h"

namespace lozoo {

struct Geometry {
  int64_t n = 0;          // elements (a scalar counts as one)
  bool factored = false;  // rank ≥ 2
  bool d0_is_a = false;   // d0 < d1: r is the a-stat
  int64_t A = 1, Sa = 1, B = 1, Sb = 1, C = 1;

  LOZOO_HD int64_t size_a_stat() const { return A * B * Sb * C; }
  LOZOO_HD int64_t size_b_stat() const { return A * Sa * B * C; }
  LOZOO_HD int64_t size_r() const { return d0_is_a ? size_a_stat() : size_b_stat(); }
  LOZOO_HD int64_t size_c() const { return d0_is_a ? size_b_stat() : size_a_stat(); }
  LOZOO_HD int64_t size_mean() const { return A * B * C; }  // r with d1 removed as well

  // Element e (row-major flat index) → its entries in r and c.
  LOZOO_HD void row_col_index(int64_t e, int64_t& ri, int64_t& ci) const {
    const int64_t run = Sb * C;
    const int64_t o = e / run;      // (α, i_a, β) flattened
    const int64_t j = e - o * run;  // (i_b, γ) flattened
    const int64_t alpha = o / (Sa * B);
    const int64_t beta = o % B;
    const int64_t ia = (alpha * B + beta) * run + j;  // i_a removed
    const int64_t ib = o * C + j % C;                  // i_b removed
    ri = d0_is_a ? ia : ib;
    ci = d0_is_a ? ib : ia;
  }

  // r viewed as [outer, R, inner] where R is axis d1: the axis of the row-factor mean.
  LOZOO_HD int64_t mean_outer() const { return d0_is_a ? A * B : A; }
  LOZOO_HD int64_t mean_len() const { return d0_is_a ? Sb : Sa; }
  LOZOO_HD int64_t mean_inner() const { return d0_is_a ? C : B * C; }
  LOZOO_HD int64_t mean_index(int64_t ri) const {
    const int64_t inner = mean_inner();
    const int64_t o = ri / (mean_len() * inner);
    return o * inner + ri % inner;
  }
};

// shape/rank describe the parameter (a rank-0 parameter is passed as rank 1 of size 1).
inline Geometry make_geometry(const int64_t* shape, int64_t rank, int64_t d1, int64_t d0) {
  Geometry geo;
  geo.n = 1;
  for (int64_t i = 0; i < rank; ++i) geo.n *= shape[i];
  if (d0 < 0) return geo;
  geo.factored = true;
  const int64_t a = d0 < d1 ? d0 : d1;
  const int64_t b = d0 < d1 ? d1 : d0;
  geo.d0_is_a = d0 == a;
  for (int64_t i = 0; i < a; ++i) geo.A *= shape[i];
  geo.Sa = shape[a];
  for (int64_t i = a + 1; i < b; ++i) geo.B *= shape[i];
  geo.Sb = shape[b];
  for (int64_t i = b + 1; i < rank; ++i) geo.C *= shape[i];
  return geo;
}

}  // namespace lozoo
