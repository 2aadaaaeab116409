// CUDA kernel of lozoo::small_fc_step_, same semantics and passes as the CPU kernel (docs/design/small_fc_lopt.md §13):
//   0. (rank ≥ 2) Σ g² over d0 and over d1 (any rank: indices from the [A, Sa, B, Sb, C] view,
//      trap T2), update r and c, Σ r over d1 for the row-factor mean (over d1 only, trap T1).
//   1. accumulate_kernel: update m, v (vd), build the 28 features, per-block channel sums of
//      squares (fp32 per thread, fp64 across threads and blocks: no fp16 overflow, trap T3).
//   2. fold_kernel: channel scales into w0, time features into b0; update_kernel: features →
//      MLP (weights in shared memory) → step → p, in the parameter's dtype.
// Every launch uses the current stream, indices are 64-bit, reductions have a fixed order (the
// grid size depends only on n), so results are bit-identical run to run.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "small_fc_cuda.h"
#include "small_fc_math.h"

namespace lozoo::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxAccumulateBlocks = 2048;  // fixed: keeps the reduction order n-only
constexpr int kMaxHidden = 128;                 // per-thread arrays of the generic MLP path

struct Decays {
  float bm[3], ombm[3], bv, ombv, bf[3], ombf[3];
};

__device__ __forceinline__ Decays load_decays(const float* d) {
  Decays out;
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    out.bm[k] = d[k];
    out.ombm[k] = 1.0f - d[k];
    out.bf[k] = d[4 + k];
    out.ombf[k] = 1.0f - d[4 + k];
  }
  out.bv = d[3];
  out.ombv = 1.0f - d[3];
  return out;
}

template <typename T>
__device__ __forceinline__ float load_grad(const T* g, int64_t i, bool maximize) {
  const float x = static_cast<float>(g[i]);
  return maximize ? -x : x;
}

// out[o·inner + i] = Σ_r value(x[(o·R + r)·inner + i]) in fp64, one fixed order per output.
// inner ≥ 32: one thread per output (coalesced along i); else one warp per output.
template <typename T, bool kSquare>
__global__ void reduce_middle_kernel(const T* __restrict__ x, int64_t outer, int64_t R,
                                     int64_t inner, double* __restrict__ out) {
  const int64_t outputs = outer * inner;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  auto value = [&](int64_t idx) -> double {
    const float f = static_cast<float>(x[idx]);
    return static_cast<double>(kSquare ? squared_grad(f) : f);
  };
  if (inner >= 32) {
    if (tid >= outputs) return;
    const int64_t o = tid / inner, i = tid - o * inner;
    double sum = 0.0;
    for (int64_t r = 0; r < R; ++r) sum += value((o * R + r) * inner + i);
    out[tid] = sum;
    return;
  }
  const int64_t warp = tid / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= outputs) return;  // whole warps exit together: warp is uniform across lanes
  const int64_t o = warp / inner, i = warp - o * inner;
  double sum = 0.0;
  for (int64_t r = lane; r < R; r += 32) sum += value((o * R + r) * inner + i);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) sum += __shfl_down_sync(0xffffffffu, sum, off);
  if (lane == 0) out[warp] = sum;
}

// state[i, k] ← ema(β_f,k, state[i, k], sum[i] / len): the r or c update of design §4.2.
__global__ void update_stat_kernel(float* __restrict__ state, const double* __restrict__ sums,
                                   int64_t count, double len, const float* __restrict__ decays) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  const Decays d = load_decays(decays);
  const float mean = static_cast<float>(sums[i] / len);
#pragma unroll
  for (int k = 0; k < 3; ++k) state[3 * i + k] = ema(d.bf[k], d.ombf[k], state[3 * i + k], mean);
}

struct Stats {  // the factored statistics an element needs (rank ≥ 2 only)
  const float* r;
  const float* c;
  const double* r_sum_d1;  // Σ r over axis d1, (mean index)·3 + k
  double inv_mean_len;
};

// Channels 0-27 of element e from the updated state (same helpers as the CPU kernel).
template <typename T>
__device__ __forceinline__ void element_features(const Geometry& geo, const Stats& st,
                                                 const T* grad, const T* param, const float* m,
                                                 const float* v, const float* vd, bool maximize,
                                                 int64_t e, float* x) {
  const float g = load_grad(grad, e, maximize);
  const float mk[3] = {m[3 * e], m[3 * e + 1], m[3 * e + 2]};
  common_features(g, static_cast<float>(param[e]), mk, v[e], x, 1);
  if (!geo.factored) {
    const float vdk[3] = {vd[3 * e], vd[3 * e + 1], vd[3 * e + 2]};
    unfactored_features(g, mk, vdk, x, 1);
    return;
  }
  int64_t ri, ci;
  geo.row_col_index(e, ri, ci);
  const int64_t mi = geo.mean_index(ri);
  float row[3], col[3], rrs[3], crs[3], mult[3];
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    row[k] = st.r[3 * ri + k];
    col[k] = st.c[3 * ci + k];
    rrs[k] = stat_rsqrt(row[k]);
    crs[k] = stat_rsqrt(col[k]);
    const float mean = static_cast<float>(st.r_sum_d1[3 * mi + k] * st.inv_mean_len);
    mult[k] = row_factor(row[k], mean) * col_factor(col[k]);
  }
  factored_features(g, mk, mult, row, col, rrs, crs, x, 1);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    accumulate_kernel(Geometry geo, Stats st, const T* __restrict__ grad,
                      const T* __restrict__ param, float* __restrict__ m, float* __restrict__ v,
                      float* __restrict__ vd, const float* __restrict__ decays, bool maximize,
                      double* __restrict__ partials) {
  const Decays d = load_decays(decays);
  float acc[kElemFeatures];
#pragma unroll
  for (int ch = 0; ch < kElemFeatures; ++ch) acc[ch] = 0.0f;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < geo.n;
       e += stride) {
    const float g = load_grad(grad, e, maximize);
#pragma unroll
    for (int k = 0; k < 3; ++k) m[3 * e + k] = ema(d.bm[k], d.ombm[k], m[3 * e + k], g);
    v[e] = ema(d.bv, d.ombv, v[e], g * g);
    if (!geo.factored) {
#pragma unroll
      for (int k = 0; k < 3; ++k)
        vd[3 * e + k] = ema(d.bf[k], d.ombf[k], vd[3 * e + k], squared_grad(g));
    }
    float x[kElemFeatures];
    element_features(geo, st, grad, param, m, v, vd, maximize, e, x);
#pragma unroll
    for (int ch = 0; ch < kElemFeatures; ++ch) acc[ch] += x[ch] * x[ch];
  }
  __shared__ float warp_sums[kWarps][kElemFeatures];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int ch = 0; ch < kElemFeatures; ++ch) {
    float s = acc[ch];
#pragma unroll
    for (int off = 16; off > 0; off /= 2) s += __shfl_down_sync(0xffffffffu, s, off);
    if (lane == 0) warp_sums[warp][ch] = s;
  }
  __syncthreads();
  if (threadIdx.x < kElemFeatures) {
    double s = 0.0;
    for (int w = 0; w < kWarps; ++w) s += warp_sums[w][threadIdx.x];
    partials[static_cast<int64_t>(blockIdx.x) * kElemFeatures + threadIdx.x] = s;
  }
}

// One block: channel scales from the block partials (fixed order), then w0' = s_j·w0[j] for
// j < 28 and b0' = b0 + tanh(t/τ − 1) @ w0[28:], written to the head of `packed`.
__global__ void fold_kernel(const double* __restrict__ partials, int64_t blocks, int64_t n,
                            const float* __restrict__ w0, const float* __restrict__ b0, int h,
                            float t, float* __restrict__ packed) {
  __shared__ float scale[kElemFeatures];
  if (threadIdx.x < kElemFeatures) {
    double s = 0.0;
    for (int64_t b = 0; b < blocks; ++b) s += partials[b * kElemFeatures + threadIdx.x];
    scale[threadIdx.x] = rsqrt_exact(kEpsNorm + static_cast<float>(s / static_cast<double>(n)));
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < kElemFeatures * h; idx += blockDim.x)
    packed[idx] = w0[idx] * scale[idx / h];
  for (int o = threadIdx.x; o < h; o += blockDim.x) {
    float bias = 0.0f;
    for (int j = 0; j < kTimeFeatures; ++j)
      bias += time_feature(t, j) * w0[(kElemFeatures + j) * h + o];
    packed[kElemFeatures * h + o] = b0[o] + bias;
  }
}

// One dense layer for one element: out[o] = act(b[o] + Σ_i in[i]·w[i, o]), weights in shared
// memory (every lane reads the same word: a broadcast). H > 0: exact width, unrolled, float4
// weight loads; H == 0: runtime width h ≤ kMaxHidden.
template <int H>
__device__ __forceinline__ void dense(const float* in, int fan_in, const float* w, const float* b,
                                      int h, float* out, bool relu) {
  if constexpr (H > 0) {
#pragma unroll
    for (int o = 0; o < H; ++o) out[o] = b[o];
    for (int i = 0; i < fan_in; ++i) {
      const float xi = in[i];
      const float4* w4 = reinterpret_cast<const float4*>(w + i * H);
#pragma unroll
      for (int q = 0; q < H / 4; ++q) {
        const float4 wq = w4[q];
        out[4 * q] += xi * wq.x;
        out[4 * q + 1] += xi * wq.y;
        out[4 * q + 2] += xi * wq.z;
        out[4 * q + 3] += xi * wq.w;
      }
    }
    if (relu) {
#pragma unroll
      for (int o = 0; o < H; ++o) out[o] = out[o] < 0.0f ? 0.0f : out[o];
    }
  } else {
    for (int o = 0; o < h; ++o) {
      float acc = b[o];
      for (int i = 0; i < fan_in; ++i) acc += in[i] * w[i * h + o];
      out[o] = relu && acc < 0.0f ? 0.0f : acc;
    }
  }
}

template <int H>
__device__ __forceinline__ void copy_hidden(const float* from, float* to, int h) {
  if constexpr (H > 0) {
#pragma unroll
    for (int o = 0; o < H; ++o) to[o] = from[o];
  } else {
    for (int o = 0; o < h; ++o) to[o] = from[o];
  }
}

// The (h, 2) output layer and its bias (stored right after it): direction d and magnitude.
template <int H>
__device__ __forceinline__ void output_layer(const float* a, const float* w, int h, float& d,
                                             float& mag) {
  d = w[2 * h];
  mag = w[2 * h + 1];
  if constexpr (H > 0) {
#pragma unroll
    for (int i = 0; i < H; ++i) {
      d += a[i] * w[2 * i];
      mag += a[i] * w[2 * i + 1];
    }
  } else {
    for (int i = 0; i < h; ++i) {
      d += a[i] * w[2 * i];
      mag += a[i] * w[2 * i + 1];
    }
  }
}

struct MlpShape {
  int h;       // hidden width
  int layers;  // weight matrices (≥ 2)
};

template <typename T, int H>
__global__ void __launch_bounds__(kThreads)
    update_kernel(Geometry geo, Stats st, const T* __restrict__ grad, T* __restrict__ param,
                  const float* __restrict__ m, const float* __restrict__ v,
                  const float* __restrict__ vd, bool maximize, const float* __restrict__ packed,
                  int64_t packed_len, MlpShape mlp, float step_mult, float exp_mult, float lr,
                  float decay, bool has_decay) {
  extern __shared__ float4 smem4[];  // float4: 16-byte aligned for the float4 weight loads
  float* weights = reinterpret_cast<float*>(smem4);
  for (int64_t i = threadIdx.x; i < packed_len; i += blockDim.x) weights[i] = packed[i];
  __syncthreads();
  constexpr int kWidth = H > 0 ? H : kMaxHidden;
  const int h = H > 0 ? H : mlp.h;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < geo.n;
       e += stride) {
    float x[kElemFeatures];
    element_features(geo, st, grad, param, m, v, vd, maximize, e, x);
    float a[kWidth], b[kWidth];
    const float* w = weights;
    dense<H>(x, kElemFeatures, w, w + kElemFeatures * h, h, a, true);
    w += (kElemFeatures + 1) * h;
    for (int l = 1; l + 1 < mlp.layers; ++l) {
      dense<H>(a, h, w, w + h * h, h, b, true);
      copy_hidden<H>(b, a, h);
      w += (h + 1) * h;
    }
    float d, mag;
    output_layer<H>(a, w, h, d, mag);
    const float p = static_cast<float>(param[e]);
    param[e] = static_cast<T>(
        apply_step(p, learned_step(d, mag, step_mult, exp_mult), lr, decay, has_decay));
  }
}

int64_t blocks_for(int64_t work) { return (work + kThreads - 1) / kThreads; }

template <typename T>
void reduce_middle(const T* x, int64_t outer, int64_t R, int64_t inner, double* out,
                   cudaStream_t stream, bool square) {
  const int64_t outputs = outer * inner;
  const int64_t threads = inner >= 32 ? outputs : outputs * 32;
  if (square)
    reduce_middle_kernel<T, true>
        <<<blocks_for(threads), kThreads, 0, stream>>>(x, outer, R, inner, out);
  else
    reduce_middle_kernel<T, false>
        <<<blocks_for(threads), kThreads, 0, stream>>>(x, outer, R, inner, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_typed(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m,
                  const at::Tensor& v, const at::Tensor& r, const at::Tensor& c,
                  const at::Tensor& vd, const at::Tensor& decays, at::TensorList layers,
                  const Geometry& geo, int64_t hidden, const StepScalars& s) {
  // Packed MLP: [w0' (28h) | b0' (h) | w1 | b1 | ... | wL (h·2) | bL (2)], checked before any
  // launch so a rejected call leaves the state untouched.
  const int h = static_cast<int>(hidden);
  const int num_layers = static_cast<int>(layers.size() / 2);
  int64_t packed_len = (kElemFeatures + 1) * h;
  for (int l = 1; l < num_layers; ++l)
    packed_len += layers[2 * l].numel() + layers[2 * l + 1].numel();
  const size_t smem = static_cast<size_t>(packed_len) * sizeof(float);
  TORCH_CHECK(smem <= 48 * 1024 && h <= kMaxHidden,
              "lozoo::small_fc_step_: the CUDA kernel keeps the MLP in 48 KiB of shared memory "
              "and supports h <= ", kMaxHidden, "; this MLP (h = ", h, ", ", num_layers,
              " layers) needs ", smem, " bytes. Use backend='torch'.");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto f64 = param.options().dtype(at::kDouble);
  const T* g = grad.const_data_ptr<T>();
  Stats st{nullptr, nullptr, nullptr, 0.0};
  at::Tensor sums;
  if (geo.factored) {
    // Σ g² with axis a removed ([A, Sa, B·Sb·C]) and with axis b removed ([A·Sa·B, Sb, C]).
    const int64_t na = geo.size_a_stat(), nb = geo.size_b_stat();
    sums = at::empty({na + nb + 3 * geo.size_mean()}, f64);
    double* sum_a = sums.data_ptr<double>();
    double* sum_b = sum_a + na;
    double* r_sum_d1 = sum_b + nb;
    reduce_middle(g, geo.A, geo.Sa, geo.B * geo.Sb * geo.C, sum_a, stream, true);
    reduce_middle(g, geo.A * geo.Sa * geo.B, geo.Sb, geo.C, sum_b, stream, true);
    const double* sum_r = geo.d0_is_a ? sum_a : sum_b;
    const double* sum_c = geo.d0_is_a ? sum_b : sum_a;
    const double len_r = static_cast<double>(geo.d0_is_a ? geo.Sa : geo.Sb);
    const double len_c = static_cast<double>(geo.d0_is_a ? geo.Sb : geo.Sa);
    float* rp = r.data_ptr<float>();
    float* cp = c.data_ptr<float>();
    const float* dp = decays.const_data_ptr<float>();
    update_stat_kernel<<<blocks_for(geo.size_r()), kThreads, 0, stream>>>(
        rp, sum_r, geo.size_r(), len_r, dp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    update_stat_kernel<<<blocks_for(geo.size_c()), kThreads, 0, stream>>>(
        cp, sum_c, geo.size_c(), len_c, dp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // Σ r over axis d1: r viewed as [outer, R = S[d1], inner·3] (decay axis trailing).
    reduce_middle(static_cast<const float*>(rp), geo.mean_outer(), geo.mean_len(),
                  geo.mean_inner() * 3, r_sum_d1, stream, false);
    st = Stats{rp, cp, r_sum_d1, 1.0 / static_cast<double>(geo.mean_len())};
  }
  float* vdp = vd.defined() ? vd.data_ptr<float>() : nullptr;
  const int64_t blocks = std::min(blocks_for(geo.n), kMaxAccumulateBlocks);
  at::Tensor partials = at::empty({blocks, kElemFeatures}, f64);
  accumulate_kernel<T><<<blocks, kThreads, 0, stream>>>(
      geo, st, g, param.const_data_ptr<T>(), m.data_ptr<float>(), v.data_ptr<float>(), vdp,
      decays.const_data_ptr<float>(), s.maximize, partials.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor packed = at::empty({packed_len}, param.options().dtype(at::kFloat));
  fold_kernel<<<1, kThreads, 0, stream>>>(partials.const_data_ptr<double>(), blocks, geo.n,
                                          layers[0].const_data_ptr<float>(),
                                          layers[1].const_data_ptr<float>(), h,
                                          static_cast<float>(s.t), packed.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  int64_t offset = (kElemFeatures + 1) * h;
  for (int l = 1; l < num_layers; ++l)
    for (int part = 0; part < 2; ++part) {
      const at::Tensor& src = layers[2 * l + part];
      packed.narrow(0, offset, src.numel()).copy_(src.reshape({-1}));  // same stream
      offset += src.numel();
    }
  const MlpShape mlp{h, num_layers};
  const float lr = static_cast<float>(s.lr);
  const float decay = static_cast<float>(1.0 - s.lr * s.weight_decay);
  const bool has_decay = s.weight_decay != 0.0;
  // Grid-stride: each block copies the MLP into shared memory once, so do not launch n/256.
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount,
                                        param.device().index()));
  const int64_t grid = std::min(blocks_for(geo.n), int64_t(sms) * 16);
#define LOZOO_LAUNCH_UPDATE(HH)                                                                \
  update_kernel<T, HH><<<grid, kThreads, smem, stream>>>(                                     \
      geo, st, g, param.data_ptr<T>(), m.const_data_ptr<float>(), v.const_data_ptr<float>(), \
      vdp, s.maximize, packed.const_data_ptr<float>(), packed_len, mlp,                       \
      static_cast<float>(s.step_mult), static_cast<float>(s.exp_mult), lr, decay, has_decay)
  switch (h) {
    case 4: LOZOO_LAUNCH_UPDATE(4); break;
    case 8: LOZOO_LAUNCH_UPDATE(8); break;
    case 16: LOZOO_LAUNCH_UPDATE(16); break;
    case 32: LOZOO_LAUNCH_UPDATE(32); break;
    case 64: LOZOO_LAUNCH_UPDATE(64); break;
    default: LOZOO_LAUNCH_UPDATE(0); break;
  }
#undef LOZOO_LAUNCH_UPDATE
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_small_fc_step(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m,
                          const at::Tensor& v, const at::Tensor& r, const at::Tensor& c,
                          const at::Tensor& vd, const at::Tensor& decays, at::TensorList layers,
                          const Geometry& geo, int64_t hidden, const StepScalars& s) {
  switch (param.scalar_type()) {
    case at::kFloat:
      return launch_typed<float>(param, grad, m, v, r, c, vd, decays, layers, geo, hidden, s);
    case at::kBFloat16:
      return launch_typed<c10::BFloat16>(param, grad, m, v, r, c, vd, decays, layers, geo,
                                         hidden, s);
    default:
      return launch_typed<c10::Half>(param, grad, m, v, r, c, vd, decays, layers, geo, hidden,
                                     s);
  }
}

}  // namespace lozoo::cuda
