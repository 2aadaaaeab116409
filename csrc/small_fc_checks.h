// Host-side argument validation of lozoo::small_fc_step_, shared by the CPU and CUDA bindings.
// The messages are matched by tests (tests/test_kernels_ops.py) and mirrored by the pure-torch
// twin's validator (lopt/kernels/validate.py), so keep the three in sync.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "small_fc_geometry.h"

namespace lozoo {

// The one schema of the op; lopt/kernels/ops.py documents every argument.
constexpr const char* kStepSchema =
    "small_fc_step_(Tensor(a!) param, Tensor grad, Tensor(b!) m, Tensor(c!) v, "
    "Tensor(d!)? r, Tensor(e!)? c, Tensor(f!)? vd, Tensor decays, Tensor[] layers, "
    "int d1, int d0, float t, float lr, float weight_decay, float step_mult, float exp_mult, "
    "bool maximize) -> ()";

// Lane-batched form (lopt/kernels/ops.py documents it): every tensor argument gains a leading
// lane axis L, and the step counter becomes a float32 tensor t of shape (L,).
constexpr const char* kLanesStepSchema =
    "small_fc_lanes_step_(Tensor(a!) param, Tensor grad, Tensor(b!) m, Tensor(c!) v, "
    "Tensor(d!)? r, Tensor(e!)? c, Tensor(f!)? vd, Tensor decays, Tensor[] layers, "
    "int d1, int d0, Tensor t, float lr, float weight_decay, float step_mult, float exp_mult, "
    "bool maximize) -> ()";

inline std::string shape_str(at::IntArrayRef s) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < s.size(); ++i) out << (i ? ", " : "") << s[i];
  out << (s.size() == 1 ? ",)" : ")");
  return out.str();
}

// Shapes of the per-element state: ``shape + [last]`` and, for the factored r/c accumulators,
// ``shape`` without ``axis`` + [3] (shared with velo_math.h).
inline std::vector<int64_t> with_last(std::vector<int64_t> shape, int64_t last) {
  shape.push_back(last);
  return shape;
}

inline std::vector<int64_t> without_axis(const std::vector<int64_t>& shape, int64_t axis) {
  std::vector<int64_t> out;
  for (int64_t i = 0; i < static_cast<int64_t>(shape.size()); ++i)
    if (i != axis) out.push_back(shape[i]);
  return with_last(out, 3);
}

#define LOZOO_CHECK(cond, ...) TORCH_CHECK(cond, "lozoo::small_fc_step_: ", __VA_ARGS__)

inline void check_state(const at::Tensor& t, const char* name, const std::vector<int64_t>& want,
                        const at::Tensor& param) {
  LOZOO_CHECK(t.device() == param.device(), name, " is on ", t.device(),
              " but param is on ", param.device());
  LOZOO_CHECK(t.scalar_type() == at::kFloat, name, " must be float32 state, got ",
              t.scalar_type());
  LOZOO_CHECK(t.sizes().vec() == want, name, " has shape ", shape_str(t.sizes()),
              " but a param of shape ", shape_str(param.sizes()), " needs ", shape_str(want));
  LOZOO_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// Validates everything and returns the geometry; *hidden receives the MLP width h.
inline Geometry check_step_args(const at::Tensor& param, const at::Tensor& grad,
                                const at::Tensor& m, const at::Tensor& v,
                                const std::optional<at::Tensor>& r,
                                const std::optional<at::Tensor>& c,
                                const std::optional<at::Tensor>& vd, const at::Tensor& decays,
                                at::TensorList layers, int64_t d1, int64_t d0, int64_t* hidden) {
  const auto dt = param.scalar_type();
  LOZOO_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "param must be float32, bfloat16 or float16, got ", dt);
  LOZOO_CHECK(grad.scalar_type() == dt, "grad must have param's dtype (", dt, "), got ",
              grad.scalar_type());
  LOZOO_CHECK(grad.sizes() == param.sizes(), "grad has shape ", shape_str(grad.sizes()),
              " but param has shape ", shape_str(param.sizes()));
  LOZOO_CHECK(grad.device() == param.device(), "grad is on ", grad.device(),
              " but param is on ", param.device());
  LOZOO_CHECK(param.is_contiguous(), "param must be contiguous (it is updated in place)");
  LOZOO_CHECK(param.numel() < (int64_t(1) << 62), "param is too large");

  std::vector<int64_t> shape = param.sizes().vec();
  if (shape.empty()) shape = {1};  // docs/design/small_fc_lopt.md §4.3: a scalar is stepped as one element of rank 1
  const int64_t rank = static_cast<int64_t>(shape.size());
  check_state(m, "m", with_last(shape, 3), param);
  check_state(v, "v", with_last(shape, 1), param);
  if (rank >= 2) {
    LOZOO_CHECK(d0 >= 0 && d1 >= 0 && d0 < rank && d1 < rank && d0 != d1, "(d1, d0) = (", d1,
                ", ", d0, ") are not two distinct axes of a rank-", rank, " param");
    LOZOO_CHECK(r.has_value() && c.has_value() && !vd.has_value(), "a rank-", rank,
                " param needs the factored state r and c, and no vd");
    check_state(*r, "r", without_axis(shape, d0), param);
    check_state(*c, "c", without_axis(shape, d1), param);
  } else {
    LOZOO_CHECK(d0 == -1 && d1 == -1, "a rank-", param.dim(),
                " param has no factored axes; pass d1 = d0 = -1, got (", d1, ", ", d0, ")");
    LOZOO_CHECK(vd.has_value() && !r.has_value() && !c.has_value(), "a rank-", param.dim(),
                " param needs the non-factored state vd, and no r or c");
    check_state(*vd, "vd", with_last(shape, 3), param);
  }
  LOZOO_CHECK(decays.device() == param.device() && decays.scalar_type() == at::kFloat &&
                  decays.numel() == kNumDecays && decays.is_contiguous(),
              "decays must be a contiguous float32 tensor of 7 elements on param's device, got ",
              decays.scalar_type(), " of shape ", shape_str(decays.sizes()), " on ",
              decays.device());

  const int64_t nl = static_cast<int64_t>(layers.size());
  LOZOO_CHECK(nl >= 4 && nl % 2 == 0,
              "layers must be [w0, b0, w1, b1, ..., wL, bL] with at least two weight matrices, "
              "got ", nl, " tensors");
  const int64_t h = layers[0].dim() == 2 ? layers[0].size(1) : -1;
  LOZOO_CHECK(h >= 1, "layers[0] (w0) must have shape (39, h), got ",
              shape_str(layers[0].sizes()));
  for (int64_t i = 0; i < nl; ++i) {
    const at::Tensor& w = layers[i];
    const int64_t k = i / 2;
    const int64_t fan_in = k == 0 ? kFeatures : h;
    const int64_t fan_out = 2 * k + 2 == nl ? 2 : h;
    const std::vector<int64_t> want =
        i % 2 == 0 ? std::vector<int64_t>{fan_in, fan_out} : std::vector<int64_t>{fan_out};
    LOZOO_CHECK(w.sizes().vec() == want, "layers[", i, "] (", (i % 2 ? "b" : "w"), k,
                ") must have shape ", shape_str(want), ", got ", shape_str(w.sizes()));
    LOZOO_CHECK(w.device() == param.device() && w.scalar_type() == at::kFloat &&
                    w.is_contiguous(),
                "layers[", i, "] must be a contiguous float32 tensor on param's device, got ",
                w.scalar_type(), " on ", w.device());
  }
  *hidden = h;
  return make_geometry(shape.data(), rank, rank >= 2 ? d1 : -1, rank >= 2 ? d0 : -1);
}

#define LOZOO_LANES_CHECK(cond, ...) \
  TORCH_CHECK(cond, "lozoo::small_fc_lanes_step_: ", __VA_ARGS__)

// small_fc_lanes_step_: the lane axis of every argument, then lane 0's slices as one
// small_fc_step_ call (all lanes share their shapes, so that validates every lane).
inline Geometry check_lanes_step_args(const at::Tensor& param, const at::Tensor& grad,
                                      const at::Tensor& m, const at::Tensor& v,
                                      const std::optional<at::Tensor>& r,
                                      const std::optional<at::Tensor>& c,
                                      const std::optional<at::Tensor>& vd,
                                      const at::Tensor& decays, at::TensorList layers,
                                      int64_t d1, int64_t d0, const at::Tensor& t,
                                      int64_t* hidden) {
  LOZOO_LANES_CHECK(param.dim() >= 1, "param needs a leading lane axis, got a 0-d tensor");
  const int64_t lanes = param.size(0);
  auto lane_axis = [&](const at::Tensor& x, const std::string& name) {
    LOZOO_LANES_CHECK(x.dim() >= 1 && x.size(0) == lanes, name, " must have param's ", lanes,
                      " lanes on its leading axis, got shape ", shape_str(x.sizes()));
    LOZOO_LANES_CHECK(x.is_contiguous(), name, " must be contiguous");
  };
  lane_axis(param, "param");
  LOZOO_LANES_CHECK(grad.dim() >= 1 && grad.size(0) == lanes, "grad must have param's ", lanes,
                    " lanes on its leading axis, got shape ", shape_str(grad.sizes()));
  lane_axis(m, "m");
  lane_axis(v, "v");
  if (r.has_value()) lane_axis(*r, "r");
  if (c.has_value()) lane_axis(*c, "c");
  if (vd.has_value()) lane_axis(*vd, "vd");
  lane_axis(decays, "decays");
  for (size_t i = 0; i < layers.size(); ++i) lane_axis(layers[i], "layers[" + std::to_string(i) + "]");
  LOZOO_LANES_CHECK(t.device() == param.device() && t.scalar_type() == at::kFloat &&
                        t.dim() == 1 && t.size(0) == lanes && t.is_contiguous(),
                    "t must be a contiguous float32 tensor of shape (", lanes,
                    ",) on param's device (one step counter per lane), got ", t.scalar_type(),
                    " of shape ", shape_str(t.sizes()), " on ", t.device());
  if (lanes == 0) return Geometry{};
  auto first = [](const std::optional<at::Tensor>& x) {
    return x.has_value() ? std::optional<at::Tensor>(x->select(0, 0)) : std::nullopt;
  };
  std::vector<at::Tensor> lane_layers;
  for (const at::Tensor& w : layers) lane_layers.push_back(w.select(0, 0));
  try {
    return check_step_args(param.select(0, 0), grad.select(0, 0), m.select(0, 0),
                           v.select(0, 0), first(r), first(c), first(vd), decays.select(0, 0),
                           lane_layers, d1, d0, hidden);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "lozoo::small_fc_lanes_step_: per lane: ", e.what_without_backtrace());
  }
}

}  // namespace lozoo
