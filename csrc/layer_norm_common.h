// Argument checks and output allocation shared by the CPU and CUDA LayerNorm implementations.
// Checks raise ValueError / TypeError (BERTKERN_CHECK_VALUE / BERTKERN_CHECK_TYPE) naming the
// argument, before any kernel runs. The Python API (bertkern/ops/layer_norm.py) checks the same
// things first with friendlier messages; these guard direct torch.ops.bertkern calls.
#pragma once

#include "torch_api.h"

#include <tuple>
#include <utility>
#include <vector>

namespace bertkern {

inline void check_same_as_x(const Tensor& x, const Tensor& t, const char* name,
                            bool same_shape) {
  BERTKERN_CHECK_VALUE(t.device() == x.device(), "layer_norm: ", name, " is on ", t.device(),
                    " but x is on ", x.device());
  BERTKERN_CHECK_TYPE(t.scalar_type() == x.scalar_type(), "layer_norm: ", name, " has dtype ",
                   t.scalar_type(), " but x has dtype ", x.scalar_type());
  if (same_shape) {
    BERTKERN_CHECK_VALUE(::bertkern::same_shape(t, x), "layer_norm: ", name, " has shape ", t.sizes(),
                      " but x has shape ", x.sizes());
  } else {
    const int64_t n = x.size(-1);
    BERTKERN_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, "layer_norm: ", name, " has shape ",
                      t.sizes(), " but expected (", n, ",) = (x.shape[-1],)");
  }
}

inline void check_layer_norm_fwd(const Tensor& x, const OptionalTensor& residual,
                                 const OptionalTensor& weight,
                                 const OptionalTensor& bias, double eps) {
  BERTKERN_CHECK_VALUE(x.dim() >= 1, "layer_norm: x must have at least 1 dimension, got a scalar");
  BERTKERN_CHECK_TYPE(x.scalar_type() == kFloat || x.scalar_type() == kDouble ||
                       x.scalar_type() == kHalf || x.scalar_type() == kBFloat16,
                   "layer_norm: x must be float32, float16, bfloat16 (or float64 on CPU), got ",
                   x.scalar_type());
  BERTKERN_CHECK_VALUE(eps >= 0, "layer_norm: eps must be >= 0, got ", eps);
  if (residual) check_same_as_x(x, *residual, "residual", true);
  if (weight) check_same_as_x(x, *weight, "weight", false);
  if (bias) check_same_as_x(x, *bias, "bias", false);
}

inline void check_layer_norm_bwd(const Tensor& dy, const OptionalTensor& dresidual_out,
                                 const Tensor& z, const Tensor& mean,
                                 const Tensor& rstd, const OptionalTensor& weight) {
  check_layer_norm_fwd(z, std::nullopt, weight, std::nullopt, 0.0);
  check_same_as_x(z, dy, "dy", true);
  if (dresidual_out) check_same_as_x(z, *dresidual_out, "dresidual_out", true);
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < z.dim(); ++d) rows *= z.size(d);
  for (const auto& [stat, name] : {std::pair<const Tensor*, const char*>{&mean, "mean"},
                                   std::pair<const Tensor*, const char*>{&rstd, "rstd"}}) {
    BERTKERN_CHECK_VALUE(stat->device() == z.device(), "layer_norm_bwd: ", name, " is on ",
                      stat->device(), " but z is on ", z.device());
    BERTKERN_CHECK_VALUE(stat->numel() == rows, "layer_norm_bwd: ", name, " has ", stat->numel(),
                      " elements but z has ", rows, " rows");
    BERTKERN_CHECK_TYPE(stat->scalar_type() == (z.scalar_type() == kDouble ? kDouble : kFloat),
                     "layer_norm_bwd: ", name, " has dtype ", stat->scalar_type(),
                     ", expected float32 (float64 for float64 z)");
  }
}

// Statistics dtype: float32 for float32 / float16 / bfloat16, float64 for float64.
inline ScalarType stat_dtype(ScalarType t) {
  return t == kDouble ? kDouble : kFloat;
}

// Leading dims of x: mean and rstd have shape x.shape[:-1].
inline std::vector<int64_t> row_shape(const Tensor& x) {
  std::vector<int64_t> rows = shape(x);
  rows.pop_back();
  return rows;
}

}  // namespace bertkern
