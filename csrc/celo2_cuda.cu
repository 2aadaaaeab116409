// CUDA kernel of lozoo::celo2_direction (the CPU library, celo2_cpu.cpp, defines the op and
// documents its arguments). Two launches on the current stream: per-slice, per-channel sums of
// squares (one double atomic per block, slice and channel), advancing m and v in place, then one
// thread per element:
// features → MLP with the slice's normaliser folded into w0 → direction. The fold runs as ATen ops
// on the device in between, so nothing syncs the host. The per-element math is celo2_math.h,
// shared with the CPU kernel.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "celo2_math.h"

namespace lozoo::celo2 {
namespace {

constexpr int kThreads = 256;

struct View {
  const float* g;
  const float* p;
  float* m;  // advanced in place by the sums kernel
  float* v;
  const float* row;   // (L, 9, KR) or null, statistic-major
  const float* col;   // (L, 9, KC) or null
  const float* diag;  // (N, 3) or null
  int64_t L, R, C;
  int64_t kr, kc;  // lengths of the row/column statistics per slice
  bool row_by_i;
};

__device__ __forceinline__ void element_features(const View& s, int64_t e, float* x,
                                                 bool update) {
  const int64_t per_slice = s.R * s.C;
  const int64_t l = e / per_slice;
  const int64_t rem = e - l * per_slice;
  const int64_t i = rem / s.C;
  const int64_t j = rem - i * s.C;
  float row[kStatWidth], col[kStatWidth];
  const bool factored = s.row != nullptr;
  if (factored) {
    const int64_t ri = s.row_by_i ? i : j, ci = s.row_by_i ? j : i;
#pragma unroll
    for (int q = 0; q < kStatWidth; ++q) {
      row[q] = s.row[(l * kStatWidth + q) * s.kr + ri];
      col[q] = s.col[(l * kStatWidth + q) * s.kc + ci];
    }
  }
  if (update) advance_moments(clampf(s.g[e], -kGradClip, kGradClip), s.m + 3 * e, s.v + e);
  features(s.g[e], s.p[e], s.m + 3 * e, s.v[e], factored ? row : nullptr,
           factored ? col : nullptr, s.diag ? s.diag + 3 * e : nullptr, x);
}

__global__ void sums_kernel(View s, int channels, double* sums) {
  // Each block stays within one slice: blocks are laid out per slice (grid.y = slice).
  const int64_t l = blockIdx.y;
  const int64_t per_slice = s.R * s.C;
  float acc[kChannels];
#pragma unroll
  for (int c = 0; c < kChannels; ++c) acc[c] = 0.0f;
  float x[kChannels];
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < per_slice;
       k += int64_t(gridDim.x) * blockDim.x) {
    element_features(s, l * per_slice + k, x, true);
#pragma unroll
    for (int c = 0; c < kChannels; ++c)
      if (c < channels) acc[c] += x[c] * x[c];
  }
  // Warps reduce by shuffles, then the block through shared memory: one atomic per block and
  // channel. (One per warp made thousands of atomics contend for the same 30 addresses of a
  // slice; that serialisation, not the feature math, was most of this kernel's time.)
  __shared__ double partial[kThreads / 32][kChannels];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int c = 0; c < channels; ++c) {
    double value = acc[c];
    for (int offset = 16; offset > 0; offset /= 2)
      value += __shfl_down_sync(0xffffffffu, value, offset);
    if (lane == 0) partial[warp][c] = value;
  }
  __syncthreads();
  if (threadIdx.x < channels) {
    double total = 0.0;
    for (int w = 0; w < kThreads / 32; ++w) total += partial[w][threadIdx.x];
    atomicAdd(sums + l * kChannels + threadIdx.x, total);
  }
}

__global__ void direction_kernel(View s, int channels, const float* w0s, const float* b0,
                                 const float* w1, const float* b1, const float* w2,
                                 const float* b2, float* out) {
  const int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t n = s.L * s.R * s.C;
  if (e >= n) return;
  float x[kChannels];
  element_features(s, e, x, false);
  float w2c[kHidden];
#pragma unroll
  for (int o = 0; o < kHidden; ++o) w2c[o] = w2[o * 3];
  const int64_t l = e / (s.R * s.C);
  out[e] = mlp_direction(x, channels, w0s + l * kChannels * kHidden, b0, w1, b1, w2c, b2[0]);
}

at::Tensor celo2_direction_cuda(const at::Tensor& grad, const at::Tensor& param,
                                const at::Tensor& m, const at::Tensor& v,
                                const std::optional<at::Tensor>& row_stats,
                                const std::optional<at::Tensor>& col_stats,
                                const std::optional<at::Tensor>& v_diag, const at::Tensor& w0,
                                const at::Tensor& b0, const at::Tensor& w1, const at::Tensor& b1,
                                const at::Tensor& w2, const at::Tensor& b2, bool row_by_i) {
  const bool factored = check_direction_args(grad, param, m, v, row_stats, col_stats, v_diag, w0,
                                             b0, w1, b1, w2, b2, row_by_i, /*cuda=*/true);
  const int64_t L = param.size(0), R = param.size(1), C = param.size(2);
  const int64_t kr = row_by_i ? R : C, kc = row_by_i ? C : R;
  const c10::cuda::CUDAGuard guard(param.device());
  at::Tensor out = at::empty({L, R, C}, param.options());
  const int64_t n = L * R * C;
  if (n == 0) return out;
  const int channels = factored ? kChannels : kChannels1d;
  View s{grad.data_ptr<float>(), param.data_ptr<float>(), m.data_ptr<float>(),
         v.data_ptr<float>(), factored ? row_stats->data_ptr<float>() : nullptr,
         factored ? col_stats->data_ptr<float>() : nullptr,
         factored ? nullptr : v_diag->data_ptr<float>(), L, R, C, kr, kc, row_by_i};
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor sums = at::zeros({L, kChannels}, param.options().dtype(at::kDouble));
  const int64_t per_slice = R * C;
  const int blocks_x =
      static_cast<int>(std::min<int64_t>((per_slice + kThreads - 1) / kThreads, 1024));
  TORCH_CHECK(L <= 65535, "celo2_direction: at most 65535 slices per tensor on CUDA, got ", L);
  sums_kernel<<<dim3(blocks_x, static_cast<unsigned>(L)), kThreads, 0, stream>>>(
      s, channels, sums.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // w0' = rsqrt(1e-9 + mean(x²)) · w0 per slice; unused 1-D rows keep finite values.
  at::Tensor mean = (sums / static_cast<double>(per_slice)).to(at::kFloat);
  at::Tensor scale = (mean + kEpsSafe).rsqrt();
  at::Tensor w0s = (scale.unsqueeze(-1) * w0.unsqueeze(0)).contiguous();  // (L, 30, 8)
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  direction_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      s, channels, w0s.data_ptr<float>(), b0.data_ptr<float>(), w1.data_ptr<float>(),
      b1.data_ptr<float>(), w2.data_ptr<float>(), b2.data_ptr<float>(), out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace lozoo::celo2

TORCH_LIBRARY_IMPL(lozoo, CUDA, m) {
  m.impl("celo2_direction", &lozoo::celo2::celo2_direction_cuda);
}
