// CUDA launchers for the fused (residual +) LayerNorm: argument checks, output allocation, the
// current stream. Launch plans live in layer_norm_launch.cuh (shared with the host emulation),
// kernels in layer_norm.cuh.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/layer_norm_launch.cuh"
#include "cuda/stream_launch.cuh"
#include "layer_norm_common.h"

namespace bertkern {
namespace {

using namespace bertkern::cuda;

// float32, float16, bfloat16: the CUDA dtypes (float64 is CPU-only, for gradcheck).
#define BERTKERN_DISPATCH_CUDA_FLOATS(TYPE, NAME, ...)          \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
const T* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return t ? t->data_ptr<T>() : nullptr;
}

void check_cuda(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.is_cuda(), "layer_norm: ", name, " must be a CUDA tensor, got ", x.device());
  TORCH_CHECK_TYPE(x.scalar_type() != at::kDouble,
                   "layer_norm: float64 is supported on CPU only (for gradcheck); got ", name,
                   " of dtype float64 on ", x.device());
}

c10::optional<at::Tensor> contiguous(const c10::optional<at::Tensor>& t) {
  return t ? c10::optional<at::Tensor>(t->contiguous()) : c10::nullopt;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& residual_in,
    const c10::optional<at::Tensor>& weight_in, const c10::optional<at::Tensor>& bias_in,
    double eps, bool store_residual) {
  check_layer_norm_fwd(x_in, residual_in, weight_in, bias_in, eps);
  check_cuda(x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const auto residual = contiguous(residual_in);
  const auto weight = contiguous(weight_in);
  const auto bias = contiguous(bias_in);

  const int64_t N = x.size(-1);
  const int64_t M = N > 0 ? x.numel() / N : 0;
  const auto stats_shape = row_shape(x);
  const auto stat_options = x.options().dtype(at::kFloat);
  at::Tensor y = at::empty_like(x);
  at::Tensor residual_out =
      (residual && store_residual) ? at::empty_like(x) : at::empty({0}, x.options());
  if (N == 0) {
    // Nothing to normalize: mean 0 and rstd 1/sqrt(eps) keep the row's (empty) math consistent.
    return {y, residual_out, at::zeros(stats_shape, stat_options),
            at::full(stats_shape, 1.0 / std::sqrt(eps), stat_options)};
  }
  at::Tensor mean = at::empty(stats_shape, stat_options);
  at::Tensor rstd = at::empty(stats_shape, stat_options);
  if (M == 0) return {y, residual_out, mean, rstd};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  BERTKERN_DISPATCH_CUDA_FLOATS(x.scalar_type(), "layer_norm_fwd", [&] {
    const scalar_t* r = ptr_or_null<scalar_t>(residual);
    const scalar_t* w = ptr_or_null<scalar_t>(weight);
    const scalar_t* b = ptr_or_null<scalar_t>(bias);
    scalar_t* z = residual_out.numel() ? residual_out.data_ptr<scalar_t>() : nullptr;
    const bool all_aligned = aligned16(x.data_ptr()) && aligned16(y.data_ptr()) && aligned16(r) &&
                             aligned16(w) && aligned16(b) && aligned16(z);
    const LayerNormPlan plan = layer_norm_fwd_plan(M, N, sizeof(scalar_t), all_aligned);
    layer_norm_fwd_launch<scalar_t>(StreamLauncher{stream}, plan, x.data_ptr<scalar_t>(), r, w, b,
                                    y.data_ptr<scalar_t>(), z, mean.data_ptr<float>(),
                                    rstd.data_ptr<float>(), M, N, static_cast<float>(eps));
  });
  return {y, residual_out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(
    const at::Tensor& dy_in, const c10::optional<at::Tensor>& dresidual_in, const at::Tensor& z_in,
    const at::Tensor& mean_in, const at::Tensor& rstd_in, const c10::optional<at::Tensor>& weight_in,
    bool has_bias) {
  check_layer_norm_bwd(dy_in, dresidual_in, z_in, mean_in, rstd_in, weight_in);
  check_cuda(z_in, "z");
  const c10::cuda::CUDAGuard guard(z_in.device());
  const at::Tensor dy = dy_in.contiguous();
  const at::Tensor z = z_in.contiguous();
  const at::Tensor mean = mean_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  const auto dresidual = contiguous(dresidual_in);
  const auto weight = contiguous(weight_in);

  const int64_t N = z.size(-1);
  const int64_t M = N > 0 ? z.numel() / N : 0;
  at::Tensor dz = at::empty_like(z);
  // Every column of dweight / dbias is written by the kernels: no zero-fill, except for the
  // sums over no rows (M == 0), which launch nothing.
  at::Tensor dweight = at::empty({weight ? N : 0}, z.options());
  at::Tensor dbias = at::empty({has_bias ? N : 0}, z.options());
  if (M == 0) {
    dweight.zero_();
    dbias.zero_();
  }
  if (M == 0 || N == 0) return {dz, dweight, dbias};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  BERTKERN_DISPATCH_CUDA_FLOATS(z.scalar_type(), "layer_norm_bwd", [&] {
    const scalar_t* w = ptr_or_null<scalar_t>(weight);
    const scalar_t* dr = ptr_or_null<scalar_t>(dresidual);
    const bool all_aligned = aligned16(dy.data_ptr()) && aligned16(z.data_ptr()) &&
                             aligned16(dz.data_ptr()) && aligned16(w) && aligned16(dr);
    const LayerNormPlan plan =
        layer_norm_bwd_plan(M, N, sizeof(scalar_t), all_aligned, weight.has_value() || has_bias);
    at::Tensor workspace = at::empty({plan.workspace_floats}, z.options().dtype(at::kFloat));
    layer_norm_bwd_launch<scalar_t>(
        StreamLauncher{stream}, plan, plan.workspace_floats ? workspace.data_ptr<float>() : nullptr,
        dy.data_ptr<scalar_t>(), dr, z.data_ptr<scalar_t>(), mean.data_ptr<float>(),
        rstd.data_ptr<float>(), w, dz.data_ptr<scalar_t>(),
        weight ? dweight.data_ptr<scalar_t>() : nullptr,
        has_bias ? dbias.data_ptr<scalar_t>() : nullptr, M, N);
  });
  return {dz, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(bertkern, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cuda);
}

}  // namespace bertkern
