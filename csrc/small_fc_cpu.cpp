// CPU kernel of lozoo::small_fc_step_ (docs/design/small_fc_lopt.md §13): three sweeps over a tensor, never the n×39
// feature matrix.
//   0. (rank ≥ 2) Reduce g² + 1e-30 along d0 and d1, update r and c, compute the row/col factors.
//   1. Per tile: update m, v (vd), build the 28 features, sum their squares per channel.
//   2. Fold the per-channel normalisation into w0 and the time features into b0 (exact), then per
//      tile: features → MLP → step → p.
// Reductions use fixed tiles and fixed summation orders, so results are bit-identical run to run
// and independent of the thread count. Threads come from at::parallel_for (torch's OpenMP pool).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "small_fc_checks.h"
#include "small_fc_cpu_simd.h"

namespace lozoo::cpu {
namespace {

using TileFn = void (*)(const Ctx&, int64_t, int64_t, int);

// One wrapper per instruction set: the always_inline templates are compiled into each.
#define LOZOO_DEFINE_ISA(NAME, ATTR, VW, NV)                                                   \
  template <typename T>                                                                       \
  ATTR void accumulate_##NAME(const Ctx& c, int64_t t0, int64_t t1, int hmax) {              \
    float* scratch = c.scratch + at::get_thread_num() * c.scratch_floats;                     \
    for (int64_t t = t0; t < t1; ++t) accumulate_tile<VW, T>(c, t, scratch, hmax);            \
  }                                                                                           \
  template <typename T>                                                                       \
  ATTR void update_##NAME(const Ctx& c, int64_t t0, int64_t t1, int hmax) {                  \
    float* scratch = c.scratch + at::get_thread_num() * c.scratch_floats;                     \
    for (int64_t t = t0; t < t1; ++t) update_tile<VW, NV, T>(c, t, scratch, hmax);            \
  }

LOZOO_DEFINE_ISA(generic, , 4, 2)
#if defined(__x86_64__) && defined(__GNUC__)
#define LOZOO_HAVE_X86_ISA 1
LOZOO_DEFINE_ISA(avx2, __attribute__((target("avx2,fma,f16c"))), 8, 2)
LOZOO_DEFINE_ISA(avx512, __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c"))),
                 16, 4)
#endif

enum class Isa { kGeneric, kAvx2, kAvx512 };

// The widest instruction set the CPU has; $LOZOO_CPU_ISA=avx2|generic caps it (tests use this to
// run every code path on one machine).
Isa detect_isa() {
  const char* cap = std::getenv("LOZOO_CPU_ISA");
  const std::string limit = cap ? cap : "";
#ifdef LOZOO_HAVE_X86_ISA
  __builtin_cpu_init();
  if (limit != "generic" && limit != "avx2" && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
    return Isa::kAvx512;
  if (limit != "generic" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return Isa::kAvx2;
#endif
  return Isa::kGeneric;
}

const Isa kIsa = detect_isa();

template <typename T>
void pick(TileFn& acc, TileFn& upd) {
  acc = accumulate_generic<T>;
  upd = update_generic<T>;
#ifdef LOZOO_HAVE_X86_ISA
  if (kIsa == Isa::kAvx512) {
    acc = accumulate_avx512<T>;
    upd = update_avx512<T>;
  } else if (kIsa == Isa::kAvx2) {
    acc = accumulate_avx2<T>;
    upd = update_avx2<T>;
  }
#endif
}

// out = Σ over the middle axis of x viewed as [outer, R, inner], summed in double in a fixed
// order per output; finish(index, sum) consumes each result.
template <typename Load, typename Finish>
void reduce_middle(int64_t outer, int64_t R, int64_t inner, Load load, Finish finish) {
  constexpr int64_t kChunk = 256;
  const int64_t chunks = (inner + kChunk - 1) / kChunk;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, R * std::min(inner, kChunk)));
  at::parallel_for(0, outer * chunks, grain, [&](int64_t b, int64_t e) {
    double acc[kChunk];
    for (int64_t item = b; item < e; ++item) {
      const int64_t o = item / chunks, i0 = (item % chunks) * kChunk;
      const int64_t len = std::min(kChunk, inner - i0);
      if (inner == 1) {  // contiguous reduction: 8 interleaved partial sums, fixed order
        double part[8] = {};
        const int64_t base = o * R;
        int64_t r = 0;
        for (; r + 8 <= R; r += 8)
          for (int l = 0; l < 8; ++l) part[l] += load(base + r + l);
        for (; r < R; ++r) part[0] += load(base + r);
        double sum = 0.0;
        for (int l = 0; l < 8; ++l) sum += part[l];
        finish(o, sum);
        continue;
      }
      std::fill(acc, acc + len, 0.0);
      for (int64_t r = 0; r < R; ++r) {
        const int64_t base = (o * R + r) * inner + i0;
        for (int64_t i = 0; i < len; ++i) acc[i] += load(base + i);
      }
      for (int64_t i = 0; i < len; ++i) finish(o * inner + i0 + i, acc[i]);
    }
  });
}

// Work buffers live per calling thread and are reused call after call: the meta-trainer steps
// thousands of small tensors per second (one call per lane and tensor), where allocating them
// cost as much as the arithmetic. Each step uses its own thread's buffers, so lanes stepped in
// parallel never share one; inside a step, tile workers address the caller's scratch by thread id.
template <typename T>
T* thread_buffer(std::vector<T>& buffer, int64_t size) {
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
  return buffer.data();
}

// Step 0: r, c and the SoA statistic buffers (value, rsqrt(value + 1e-8), factor) per decay.
template <typename T>
void factored_statistics(Ctx& c, const T* g, float* r, float* cst) {
  const Geometry& geo = c.geo;
  const int64_t nr = geo.size_r(), nc = geo.size_c();
  static thread_local std::vector<float> statistics;
  float* base = thread_buffer(statistics, 9 * (nr + nc) + 3 * geo.size_mean());
  for (int k = 0; k < 3; ++k) {
    c.row_val[k] = base + k * nr;
    c.row_rs[k] = base + (3 + k) * nr;
    c.row_f[k] = base + (6 + k) * nr;
    c.col_val[k] = base + 9 * nr + k * nc;
    c.col_rs[k] = base + 9 * nr + (3 + k) * nc;
    c.col_f[k] = base + 9 * nr + (6 + k) * nc;
  }
  float* rmean = base + 9 * (nr + nc);
  auto sq = [g, &c](int64_t i) {
    const float x = static_cast<float>(g[i]);
    return static_cast<double>(squared_grad(x));  // sign of maximize does not matter here
  };
  // Update a statistic (r or c) from Σ g² over `len` elements and fill its value/rsqrt slots.
  auto update_stat = [&c](float* state, const float* const* val, const float* const* rs,
                          int64_t len) {
    return [=, &c](int64_t i, double sum) {
      const float mean = static_cast<float>(sum / static_cast<double>(len));
      for (int k = 0; k < 3; ++k) {
        const float s = ema(c.bf[k], c.ombf[k], state[3 * i + k], mean);
        state[3 * i + k] = s;
        const_cast<float*>(val[k])[i] = s;
        const_cast<float*>(rs[k])[i] = stat_rsqrt(s);
      }
    };
  };
  // The a-removed statistic reduces [A, Sa, B·Sb·C]; the b-removed one [A·Sa·B, Sb, C].
  const int64_t a_outer = geo.A, a_len = geo.Sa, a_inner = geo.B * geo.Sb * geo.C;
  const int64_t b_outer = geo.A * geo.Sa * geo.B, b_len = geo.Sb, b_inner = geo.C;
  auto row_fin = update_stat(r, c.row_val, c.row_rs, geo.d0_is_a ? a_len : b_len);
  auto col_fin = update_stat(cst, c.col_val, c.col_rs, geo.d0_is_a ? b_len : a_len);
  if (geo.d0_is_a) {
    reduce_middle(a_outer, a_len, a_inner, sq, row_fin);
    reduce_middle(b_outer, b_len, b_inner, sq, col_fin);
  } else {
    reduce_middle(b_outer, b_len, b_inner, sq, row_fin);
    reduce_middle(a_outer, a_len, a_inner, sq, col_fin);
  }
  // Row factor: r normalised by its mean over axis d1 only (trap T1), for each decay.
  const int64_t nm = geo.size_mean();
  for (int k = 0; k < 3; ++k) {
    const float* val = c.row_val[k];
    float* mean = rmean + k * nm;
    const double inv = 1.0 / static_cast<double>(geo.mean_len());
    reduce_middle(
        geo.mean_outer(), geo.mean_len(), geo.mean_inner(),
        [val](int64_t i) { return static_cast<double>(val[i]); },
        [mean, inv](int64_t i, double sum) { mean[i] = static_cast<float>(sum * inv); });
  }
  at::parallel_for(0, std::max(nr, nc), 4096, [&](int64_t b, int64_t e) {
    for (int k = 0; k < 3; ++k) {
      float* rf = const_cast<float*>(c.row_f[k]);
      float* cf = const_cast<float*>(c.col_f[k]);
      const float* mean = rmean + k * nm;
      for (int64_t i = b; i < std::min(e, nr); ++i)
        rf[i] = row_factor(c.row_val[k][i], mean[geo.mean_index(i)]);
      for (int64_t i = b; i < std::min(e, nc); ++i) cf[i] = col_factor(c.col_val[k][i]);
    }
  });
}

// Channel sums pass 1 skips (summed_per_element). Rank ≥ 2: Σ over elements of a statistic
// broadcast along d0 (row) or d1 (col) is the size of that axis times Σ over its entries, summed
// sequentially in fp64. Rank ≤ 1: channels 16-18 / 22-24 repeat 13-15 / 19-21.
void stat_channel_sums(const Ctx& c, double* sums) {
  const Geometry& g = c.geo;
  if (!g.factored) {
    for (int k = 0; k < 3; ++k) {
      sums[16 + k] = sums[13 + k];
      sums[22 + k] = sums[19 + k];
    }
    return;
  }
  const int64_t nr = g.size_r(), nc = g.size_c();
  const double row_mult = static_cast<double>(g.n / nr), col_mult = static_cast<double>(g.n / nc);
  for (int k = 0; k < 3; ++k) {
    double row = 0.0, row_rs = 0.0, col = 0.0, col_rs = 0.0;
    for (int64_t i = 0; i < nr; ++i) {
      row += static_cast<double>(c.row_val[k][i]) * c.row_val[k][i];
      row_rs += static_cast<double>(c.row_rs[k][i]) * c.row_rs[k][i];
    }
    for (int64_t i = 0; i < nc; ++i) {
      col += static_cast<double>(c.col_val[k][i]) * c.col_val[k][i];
      col_rs += static_cast<double>(c.col_rs[k][i]) * c.col_rs[k][i];
    }
    sums[13 + k] = row * row_mult;
    sums[16 + k] = col * col_mult;
    sums[19 + k] = row_rs * row_mult;
    sums[22 + k] = col_rs * col_mult;
  }
}

int round_up(int x, int m) { return (x + m - 1) / m * m; }

// One layer of the learned optimizer's MLP as the op received it: (fan_in, fan_out) row-major
// weights and a bias. Raw pointers, so a lane-batched call can point into lane-stacked θ tensors.
struct MlpLayer {
  const float* w;
  const float* b;
  int64_t fan_in, fan_out;
};

// The MLP layers of lane `lane` of (lane-stacked, when lane_stride is true) `layers`.
std::vector<MlpLayer> mlp_layers(at::TensorList layers, int64_t lane, bool lane_stacked) {
  std::vector<MlpLayer> out(layers.size() / 2);
  const int64_t skip = lane_stacked ? 1 : 0;
  for (size_t l = 0; l < out.size(); ++l) {
    const at::Tensor& w = layers[2 * l];
    const at::Tensor& b = layers[2 * l + 1];
    const int64_t fin = w.size(skip), fout = w.size(skip + 1);
    out[l] = MlpLayer{w.const_data_ptr<float>() + lane * fin * fout,
                      b.const_data_ptr<float>() + lane * fout, fin, fout};
  }
  return out;
}

// Step 2 prologue: the MLP with the normalisation folded into w0's rows and the time features
// into b0 (design §13), zero-padded to the register tile, in this thread's buffer.
void fold_layers(const std::vector<MlpLayer>& theta, const double* sums, int64_t n, double t,
                       int64_t h, std::vector<Layer>& layers) {
  const int num = static_cast<int>(theta.size());
  const int hp = round_up(static_cast<int>(h), 4);
  std::vector<int> kin(num), kout(num);
  int64_t total = 0;
  for (int l = 0; l < num; ++l) {
    kin[l] = l == 0 ? kElemFeatures : hp;
    kout[l] = l + 1 == num ? 2 : hp;
    total += static_cast<int64_t>(kin[l] + 1) * kout[l];
  }
  static thread_local std::vector<float> store;
  float* dst = thread_buffer(store, total);
  std::fill(dst, dst + total, 0.0f);
  layers.resize(num);
  for (int l = 0; l < num; ++l) {
    const float* w = theta[l].w;
    const float* b = theta[l].b;
    const int64_t fin = theta[l].fan_in, fout = theta[l].fan_out;
    float* W = dst;
    float* B = dst + static_cast<int64_t>(kin[l]) * kout[l];
    const int64_t rows = l == 0 ? kElemFeatures : fin;
    for (int64_t j = 0; j < rows; ++j) {
      float scale = 1.0f;
      if (l == 0) {
        const float mean_sq = static_cast<float>(sums[j] / static_cast<double>(n));
        scale = rsqrt_exact(kEpsNorm + mean_sq);
      }
      for (int64_t o = 0; o < fout; ++o) W[j * kout[l] + o] = w[j * fout + o] * scale;
    }
    for (int64_t o = 0; o < fout; ++o) {
      float bias = 0.0f;
      if (l == 0)  // b0' = b0 + tanh(t/τ − 1) @ w0[28:]
        for (int j = 0; j < kTimeFeatures; ++j)
          bias += time_feature(static_cast<float>(t), j) * w[(kElemFeatures + j) * fout + o];
      B[o] = b[o] + bias;
    }
    layers[l] = Layer{W, B, kin[l], kout[l]};
    dst = B + kout[l];
  }
}

template <typename T>
void step_impl(Ctx& c, const T* grad, float* r, float* cst, const std::vector<MlpLayer>& theta,
               int64_t h, double t) {
  if (c.geo.factored) factored_statistics<T>(c, grad, r, cst);
  const int hmax = std::max(round_up(static_cast<int>(h), 4), 2);
  const int64_t tiles = (c.geo.n + kTile - 1) / kTile;
  c.scratch_floats = round_up(static_cast<int>(Scratch::floats(hmax)), 16);
  // One scratch slot per thread id. Inside a lane-parallel region (small_fc_lanes_step_) the tile
  // loops below run inline on the calling thread, whose id may exceed what get_num_threads()
  // reports there, so size by the id as well.
  const int64_t slots = std::max(at::get_num_threads(), at::get_thread_num() + 1);
  static thread_local std::vector<float> scratch;
  static thread_local std::vector<double> tile_sums;
  c.scratch = thread_buffer(scratch, slots * c.scratch_floats);
  c.tile_sums = thread_buffer(tile_sums, tiles * kElemFeatures);
  TileFn accumulate_fn, update_fn;
  pick<T>(accumulate_fn, update_fn);
  at::parallel_for(0, tiles, 1, [&](int64_t b, int64_t e) { accumulate_fn(c, b, e, hmax); });
  double sums[kElemFeatures] = {};
  for (int64_t tile = 0; tile < tiles; ++tile)  // fixed order: thread-count independent
    for (int ch = 0; ch < kElemFeatures; ++ch) sums[ch] += c.tile_sums[tile * kElemFeatures + ch];
  stat_channel_sums(c, sums);
  std::vector<Layer> layers;
  fold_layers(theta, sums, c.geo.n, t, h, layers);
  c.layers = layers.data();
  c.num_layers = static_cast<int>(layers.size());
  at::parallel_for(0, tiles, 1, [&](int64_t b, int64_t e) { update_fn(c, b, e, hmax); });
}

// The per-tensor constants of a step: decays, multipliers, weight decay. Pointers are set by
// the caller.
Ctx make_ctx(const Geometry& geo, const float* d, double lr, double weight_decay,
             double step_mult, double exp_mult, bool maximize) {
  Ctx c{};
  c.geo = geo;
  for (int k = 0; k < 3; ++k) {
    c.bm[k] = d[k];
    c.ombm[k] = 1.0f - d[k];
    c.bf[k] = d[4 + k];
    c.ombf[k] = 1.0f - d[4 + k];
  }
  c.bv = d[3];
  c.ombv = 1.0f - d[3];
  c.maximize = maximize;
  c.step_mult = static_cast<float>(step_mult);
  c.exp_mult = static_cast<float>(exp_mult);
  c.lr = static_cast<float>(lr);
  c.has_decay = weight_decay != 0.0;
  c.decay = static_cast<float>(1.0 - lr * weight_decay);
  return c;
}

void dispatch_step(at::ScalarType dtype, Ctx& c, float* r, float* cst,
                   const std::vector<MlpLayer>& theta, int64_t h, double t) {
  switch (dtype) {
    case at::kFloat:
      return step_impl<float>(c, static_cast<const float*>(c.grad), r, cst, theta, h, t);
    case at::kBFloat16:
      return step_impl<c10::BFloat16>(c, static_cast<const c10::BFloat16*>(c.grad), r, cst,
                                      theta, h, t);
    default:
      return step_impl<c10::Half>(c, static_cast<const c10::Half*>(c.grad), r, cst, theta, h, t);
  }
}

void small_fc_step_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m,
                       const at::Tensor& v, const std::optional<at::Tensor>& r,
                       const std::optional<at::Tensor>& cst, const std::optional<at::Tensor>& vd,
                       const at::Tensor& decays, at::TensorList layers, int64_t d1, int64_t d0,
                       double t, double lr, double weight_decay, double step_mult,
                       double exp_mult, bool maximize) {
  int64_t h = 0;
  const Geometry geo = check_step_args(param, grad, m, v, r, cst, vd, decays, layers, d1, d0, &h);
  LOZOO_CHECK(param.device().is_cpu(), "the CPU kernel got a param on ", param.device());
  if (geo.n == 0) return;
  const at::Tensor g = grad.contiguous();
  Ctx c = make_ctx(geo, decays.const_data_ptr<float>(), lr, weight_decay, step_mult, exp_mult,
                   maximize);
  c.grad = g.const_data_ptr();
  c.param = param.data_ptr();
  c.m = m.data_ptr<float>();
  c.v = v.data_ptr<float>();
  c.vd = vd.has_value() ? vd->data_ptr<float>() : nullptr;
  float* rp = r.has_value() ? r->data_ptr<float>() : nullptr;
  float* cp = cst.has_value() ? cst->data_ptr<float>() : nullptr;
  dispatch_step(param.scalar_type(), c, rp, cp, mlp_layers(layers, 0, false), h, t);
}

// lozoo::small_fc_lanes_step_: small_fc_step_ on every lane of lane-stacked tensors (leading axis
// L), each lane with its own θ (decays[i], layers[*][i]) and step counter t[i]. Validates once,
// then runs the per-lane step on pointer offsets, lanes spread over threads; a lane's result is
// bit-identical to small_fc_step_ on its slices (the per-lane reductions never depend on the
// thread count).
void small_fc_lanes_step_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m,
                             const at::Tensor& v, const std::optional<at::Tensor>& r,
                             const std::optional<at::Tensor>& cst,
                             const std::optional<at::Tensor>& vd, const at::Tensor& decays,
                             at::TensorList layers, int64_t d1, int64_t d0, const at::Tensor& t,
                             double lr, double weight_decay, double step_mult, double exp_mult,
                             bool maximize) {
  int64_t h = 0;
  const Geometry geo = check_lanes_step_args(param, grad, m, v, r, cst, vd, decays, layers, d1,
                                             d0, t, &h);
  LOZOO_LANES_CHECK(param.device().is_cpu(), "the CPU kernel got a param on ", param.device());
  const int64_t lanes = param.size(0);
  if (lanes == 0 || geo.n == 0) return;
  const at::Tensor g = grad.contiguous();
  const int64_t n = geo.n, bytes = param.element_size();
  const int64_t r_len = geo.factored ? 3 * geo.size_r() : 0;
  const int64_t c_len = geo.factored ? 3 * geo.size_c() : 0;
  const float* dec = decays.const_data_ptr<float>();
  const float* steps = t.const_data_ptr<float>();
  const auto* grad_base = static_cast<const char*>(g.const_data_ptr());
  auto* param_base = static_cast<char*>(param.data_ptr());
  float* m_base = m.data_ptr<float>();
  float* v_base = v.data_ptr<float>();
  float* vd_base = vd.has_value() ? vd->data_ptr<float>() : nullptr;
  float* r_base = r.has_value() ? r->data_ptr<float>() : nullptr;
  float* c_base = cst.has_value() ? cst->data_ptr<float>() : nullptr;
  at::parallel_for(0, lanes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t lane = begin; lane < end; ++lane) {
      Ctx c = make_ctx(geo, dec + kNumDecays * lane, lr, weight_decay, step_mult, exp_mult,
                       maximize);
      c.grad = grad_base + lane * n * bytes;
      c.param = param_base + lane * n * bytes;
      c.m = m_base + lane * 3 * n;
      c.v = v_base + lane * n;
      c.vd = vd_base ? vd_base + lane * 3 * n : nullptr;
      dispatch_step(param.scalar_type(), c, r_base ? r_base + lane * r_len : nullptr,
                    c_base ? c_base + lane * c_len : nullptr, mlp_layers(layers, lane, true), h,
                    steps[lane]);
    }
  });
}

std::string cpu_isa() {
  switch (kIsa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "generic";
  }
}

}  // namespace
}  // namespace lozoo::cpu

TORCH_LIBRARY(lozoo, m) {
  m.def(lozoo::kStepSchema);
  m.def(lozoo::kLanesStepSchema);
  // Which instruction-set path the CPU kernel dispatched to ("avx512", "avx2" or "generic").
  m.def("cpu_isa() -> str", &lozoo::cpu::cpu_isa);
}

TORCH_LIBRARY_IMPL(lozoo, CPU, m) {
  m.impl("small_fc_step_", &lozoo::cpu::small_fc_step_cpu);
  m.impl("small_fc_lanes_step_", &lozoo::cpu::small_fc_lanes_step_cpu);
}
