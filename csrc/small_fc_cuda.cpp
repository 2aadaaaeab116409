// CUDA binding of lozoo::small_fc_step_: validates, guards the device and launches on the current
// stream. The op itself is defined by the CPU library (small_fc_cpu.cpp), which must be loaded
// first; this library only adds the CUDA implementation.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "small_fc_checks.h"
#include "small_fc_cuda.h"

namespace lozoo::cuda {
namespace {

void small_fc_step_cuda(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m,
                        const at::Tensor& v, const std::optional<at::Tensor>& r,
                        const std::optional<at::Tensor>& c, const std::optional<at::Tensor>& vd,
                        const at::Tensor& decays, at::TensorList layers, int64_t d1, int64_t d0,
                        double t, double lr, double weight_decay, double step_mult,
                        double exp_mult, bool maximize) {
  int64_t hidden = 0;
  const Geometry geo = check_step_args(param, grad, m, v, r, c, vd, decays, layers, d1, d0,
                                       &hidden);
  LOZOO_CHECK(param.is_cuda(), "the CUDA kernel got a param on ", param.device());
  if (geo.n == 0) return;
  const c10::cuda::CUDAGuard guard(param.device());
  const StepScalars scalars{t, lr, weight_decay, step_mult, exp_mult, maximize};
  launch_small_fc_step(param, grad.contiguous(), m, v, r.value_or(at::Tensor()),
                       c.value_or(at::Tensor()), vd.value_or(at::Tensor()), decays, layers, geo,
                       hidden, scalars);
}

}  // namespace
}  // namespace lozoo::cuda

TORCH_LIBRARY_IMPL(lozoo, CUDA, m) {
  m.impl("small_fc_step_", &lozoo::cuda::small_fc_step_cuda);
}
