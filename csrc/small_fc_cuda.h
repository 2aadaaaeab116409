// Launcher of the CUDA kernel of lozoo::small_fc_step_ (small_fc_cuda.cu); the binding and the
// argument checks live in small_fc_cuda.cpp.
#pragma once

#include <ATen/ATen.h>

#include "small_fc_geometry.h"

namespace lozoo::cuda {

struct StepScalars {
  double t, lr, weight_decay, step_mult, exp_mult;
  bool maximize;
};

// All tensors on the same CUDA device, validated by check_step_args; r/c or vd may be undefined.
void launch_small_fc_step(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m,
                          const at::Tensor& v, const at::Tensor& r, const at::Tensor& c,
                          const at::Tensor& vd, const at::Tensor& decays, at::TensorList layers,
                          const Geometry& geo, int64_t hidden, const StepScalars& s);

}  // namespace lozoo::cuda
