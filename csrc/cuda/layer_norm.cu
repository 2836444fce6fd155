// CUDA launchers for the fused (residual +) LayerNorm: argument checks, output allocation, the
// current stream. Launch plans live in layer_norm_launch.cuh (shared with the host emulation),
// kernels in layer_norm.cuh. libtorch only through torch_api.h (the stable ABI).
#include <torch/csrc/stable/accelerator.h>

#include <cmath>
#include <tuple>

#include "cuda/layer_norm_launch.cuh"
#include "cuda/stream_launch.cuh"
#include "layer_norm_common.h"
#include "torch_api.h"

namespace bertkern {
namespace {

using namespace bertkern::cuda;
using torch::stable::accelerator::DeviceGuard;

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

void check_cuda(const Tensor& x, const char* name) {
  BERTKERN_CHECK_VALUE(x.is_cuda(), "layer_norm: ", name, " must be a CUDA tensor, got ", x.device());
  BERTKERN_CHECK_TYPE(x.scalar_type() != kDouble,
                      "layer_norm: float64 is supported on CPU only (for gradcheck); got ", name,
                      " of dtype float64 on ", x.device());
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_fwd_cuda(
    const Tensor& x_in, const OptionalTensor& residual_in, const OptionalTensor& weight_in,
    const OptionalTensor& bias_in, double eps, bool store_residual) {
  check_layer_norm_fwd(x_in, residual_in, weight_in, bias_in, eps);
  check_cuda(x_in, "x");
  const DeviceGuard guard(x_in.get_device_index());
  const Tensor x = as_contiguous(x_in);
  const OptionalTensor residual = as_contiguous(residual_in);
  const OptionalTensor weight = as_contiguous(weight_in);
  const OptionalTensor bias = as_contiguous(bias_in);

  const int64_t N = x.size(-1);
  const int64_t M = N > 0 ? x.numel() / N : 0;
  const std::vector<int64_t> stats_shape = row_shape(x);
  const std::vector<int64_t> x_shape = shape(x);
  Tensor y = empty(x_shape, x.scalar_type(), x.device());
  Tensor residual_out = (residual && store_residual) ? empty(x_shape, x.scalar_type(), x.device())
                                                     : empty({0}, x.scalar_type(), x.device());
  if (N == 0) {
    // Nothing to normalize: mean 0 and rstd 1/sqrt(eps) keep the row's (empty) math consistent.
    return {y, residual_out, zeros(stats_shape, kFloat, x.device()),
            full(stats_shape, 1.0 / std::sqrt(eps), kFloat, x.device())};
  }
  Tensor mean = empty(stats_shape, kFloat, x.device());
  Tensor rstd = empty(stats_shape, kFloat, x.device());
  if (M == 0) return {y, residual_out, mean, rstd};

  const cudaStream_t stream = current_stream(x);
  BERTKERN_DISPATCH_CUDA_FLOATS(x.scalar_type(), "layer_norm_fwd", [&] {
    const scalar_t* r = const_data_or_null<scalar_t>(residual);
    const scalar_t* w = const_data_or_null<scalar_t>(weight);
    const scalar_t* b = const_data_or_null<scalar_t>(bias);
    scalar_t* z = residual_out.numel() ? data<scalar_t>(residual_out) : nullptr;
    const bool all_aligned = aligned16(x.data_ptr()) && aligned16(y.data_ptr()) && aligned16(r) &&
                             aligned16(w) && aligned16(b) && aligned16(z);
    const LayerNormPlan plan = layer_norm_fwd_plan(M, N, sizeof(scalar_t), all_aligned);
    layer_norm_fwd_launch<scalar_t>(StreamLauncher{stream}, plan, const_data<scalar_t>(x), r, w, b,
                                    data<scalar_t>(y), z, data<float>(mean), data<float>(rstd), M,
                                    N, static_cast<float>(eps));
  });
  return {y, residual_out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd_cuda(
    const Tensor& dy_in, const OptionalTensor& dresidual_in, const Tensor& z_in,
    const Tensor& mean_in, const Tensor& rstd_in, const OptionalTensor& weight_in, bool has_bias) {
  check_layer_norm_bwd(dy_in, dresidual_in, z_in, mean_in, rstd_in, weight_in);
  check_cuda(z_in, "z");
  const DeviceGuard guard(z_in.get_device_index());
  const Tensor dy = as_contiguous(dy_in);
  const Tensor z = as_contiguous(z_in);
  const Tensor mean = as_contiguous(mean_in);
  const Tensor rstd = as_contiguous(rstd_in);
  const OptionalTensor dresidual = as_contiguous(dresidual_in);
  const OptionalTensor weight = as_contiguous(weight_in);

  const int64_t N = z.size(-1);
  const int64_t M = N > 0 ? z.numel() / N : 0;
  Tensor dz = empty(shape(z), z.scalar_type(), z.device());
  // Every column of dweight / dbias is written by the kernels: no zero-fill, except for the
  // sums over no rows (M == 0), which launch nothing.
  Tensor dweight = empty({weight ? N : 0}, z.scalar_type(), z.device());
  Tensor dbias = empty({has_bias ? N : 0}, z.scalar_type(), z.device());
  if (M == 0) {
    torch::stable::zero_(dweight);
    torch::stable::zero_(dbias);
  }
  if (M == 0 || N == 0) return {dz, dweight, dbias};

  const cudaStream_t stream = current_stream(z);
  BERTKERN_DISPATCH_CUDA_FLOATS(z.scalar_type(), "layer_norm_bwd", [&] {
    const scalar_t* w = const_data_or_null<scalar_t>(weight);
    const scalar_t* dr = const_data_or_null<scalar_t>(dresidual);
    const bool all_aligned = aligned16(dy.data_ptr()) && aligned16(z.data_ptr()) &&
                             aligned16(dz.data_ptr()) && aligned16(w) && aligned16(dr);
    const LayerNormPlan plan =
        layer_norm_bwd_plan(M, N, sizeof(scalar_t), all_aligned, weight.has_value() || has_bias);
    Tensor workspace = empty({plan.workspace_floats}, kFloat, z.device());
    layer_norm_bwd_launch<scalar_t>(
        StreamLauncher{stream}, plan, plan.workspace_floats ? data<float>(workspace) : nullptr,
        const_data<scalar_t>(dy), dr, const_data<scalar_t>(z), const_data<float>(mean),
        const_data<float>(rstd), w, data<scalar_t>(dz),
        weight ? data<scalar_t>(dweight) : nullptr, has_bias ? data<scalar_t>(dbias) : nullptr, M,
        N);
  });
  return {dz, dweight, dbias};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(bertkern, CUDA, m) {
  m.impl("layer_norm_fwd", TORCH_BOX(&layer_norm_fwd_cuda));
  m.impl("layer_norm_bwd", TORCH_BOX(&layer_norm_bwd_cuda));
}

}  // namespace bertkern
