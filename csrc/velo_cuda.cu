// CUDA kernel of lozoo::velo_mlp_step_ (the CPU kernel, velo_cpu.cpp, defines the op and documents
// it). Two launches on the current stream: per-channel sums of squares (and Σp²) with one double
// atomic per warp and channel, then one thread per element: features → MLP → step → p. The
// normaliser is folded into w0 with ATen ops on the device in between, so nothing syncs the host.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "velo_math.h"

namespace lozoo::velo {
namespace {

constexpr int kThreads = 256;
constexpr int kSums = kFeatures + 1;
constexpr int kMaxLayers = 8;

struct Layers {
  int count;
  int fan_in[kMaxLayers], fan_out[kMaxLayers], w_off[kMaxLayers], b_off[kMaxLayers];
};

__global__ void sums_kernel(View s, double* sums) {
  float acc[kSums];
#pragma unroll
  for (int k = 0; k < kSums; ++k) acc[k] = 0.0f;
  float x[kFeatures];
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < s.geo.n;
       e += int64_t(gridDim.x) * blockDim.x) {
    features(s, e, x, 1);
#pragma unroll
    for (int k = 0; k < kFeatures; ++k) acc[k] += x[k] * x[k];
    acc[kFeatures] += s.p[e] * s.p[e];
  }
#pragma unroll
  for (int k = 0; k < kSums; ++k) {
    double value = acc[k];
    for (int offset = 16; offset > 0; offset /= 2)
      value += __shfl_down_sync(0xffffffffu, value, offset);
    if ((threadIdx.x & 31) == 0) atomicAdd(sums + k, value);
  }
}

__global__ void update_kernel(View s, float* p, const float* weights, Layers layers,
                              const float* lr_mult_scale, float exp_mult, float step_mult,
                              float lr, float decay, bool has_decay) {
  const int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (e >= s.geo.n) return;
  float a[kFeatures], b[kFeatures];
  features(s, e, a, 1);
  float* in = a;
  float* out = b;
  for (int l = 0; l < layers.count; ++l) {
    const float* w = weights + layers.w_off[l];
    const float* bias = weights + layers.b_off[l];
    const bool last = l + 1 == layers.count;
    const int fout = last ? 2 : layers.fan_out[l];  // the third head is never read
    for (int o = 0; o < fout; ++o) {
      float acc = bias[o];
      for (int j = 0; j < layers.fan_in[l]; ++j) acc += in[j] * w[j * layers.fan_out[l] + o];
      out[o] = last || acc > 0.0f ? acc : 0.0f;
    }
    float* tmp = in;
    in = out;
    out = tmp;
  }
  const float st = step(*lr_mult_scale, in[0], in[1], exp_mult, step_mult);
  const float old = s.p[e];
  p[e] = (has_decay ? old * decay : old) - lr * st;
}

void velo_mlp_step_cuda(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m,
                        const at::Tensor& v, const std::optional<at::Tensor>& r,
                        const std::optional<at::Tensor>& c,
                        const std::optional<at::Tensor>& rf,
                        const std::optional<at::Tensor>& cf,
                        const std::optional<at::Tensor>& vd, at::TensorList layers, int64_t d1,
                        int64_t d0, double lr_mult, double lr, double weight_decay,
                        double step_mult, double exp_mult) {
  int64_t h = 0;
  const Geometry geo = check_args(param, grad, m, v, r, c, rf, cf, vd, layers, d1, d0, &h);
  VELO_CHECK(param.is_cuda(), "the CUDA kernel got a param on ", param.device());
  const int num = static_cast<int>(layers.size() / 2);
  VELO_CHECK(num <= kMaxLayers, "the CUDA kernel supports at most ", kMaxLayers, " layers");
  if (geo.n == 0) return;
  const c10::cuda::CUDAGuard guard(param.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto ptr = [](const std::optional<at::Tensor>& t) {
    return t.has_value() ? t->const_data_ptr<float>() : nullptr;
  };
  float* p = param.data_ptr<float>();
  const View s{p, grad.const_data_ptr<float>(), m.const_data_ptr<float>(),
               v.const_data_ptr<float>(), ptr(r), ptr(c), ptr(rf), ptr(cf), ptr(vd), geo};
  at::Tensor sums = at::zeros({kSums}, param.options().dtype(at::kDouble));
  const int blocks = static_cast<int>(std::min<int64_t>((geo.n + kThreads - 1) / kThreads, 1024));
  sums_kernel<<<blocks, kThreads, 0, stream>>>(s, sums.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const double n = static_cast<double>(geo.n);
  at::Tensor mean_sq = (sums / n).to(at::kFloat);
  at::Tensor scale = (mean_sq.slice(0, 0, kFeatures) + kEpsNorm).rsqrt();
  at::Tensor lr_mult_scale = (mean_sq.slice(0, kFeatures) + kEpsParamRms).sqrt() * lr_mult;
  std::vector<at::Tensor> flat;
  Layers meta{};
  meta.count = num;
  int64_t offset = 0;
  for (int l = 0; l < num; ++l) {
    at::Tensor w = layers[2 * l];
    if (l == 0) w = w * scale.unsqueeze(1);
    meta.fan_in[l] = static_cast<int>(w.size(0));
    meta.fan_out[l] = static_cast<int>(w.size(1));
    meta.w_off[l] = static_cast<int>(offset);
    offset += w.numel();
    meta.b_off[l] = static_cast<int>(offset);
    offset += layers[2 * l + 1].numel();
    flat.push_back(w.reshape(-1));
    flat.push_back(layers[2 * l + 1].reshape(-1));
  }
  at::Tensor weights = at::cat(flat);
  const int grid = static_cast<int>((geo.n + kThreads - 1) / kThreads);
  update_kernel<<<grid, kThreads, 0, stream>>>(
      s, p, weights.const_data_ptr<float>(), meta, lr_mult_scale.const_data_ptr<float>(),
      static_cast<float>(exp_mult), static_cast<float>(step_mult), static_cast<float>(lr),
      static_cast<float>(1.0 - lr * weight_decay), weight_decay != 0.0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace lozoo::velo

TORCH_LIBRARY_IMPL(lozoo, CUDA, m) {
  m.impl("velo_mlp_step_", &lozoo::velo::velo_mlp_step_cuda);
}
