// Test-only torch extension, part 1: the LayerNorm CUDA kernels of csrc/cuda/layer_norm.cuh,
// compiled with g++ against the CUDA host emulation (cuda_host_emu.h), registered for CPU tensors
// under the bertkern_emu namespace with the same schemas as the real ops (csrc/ops.cpp). Each op
// does what the real CUDA launcher (csrc/cuda/layer_norm.cu) does (argument checks, output
// allocation, special cases) and runs the real launch plan (csrc/cuda/layer_norm_launch.cuh) on
// CPU tensors through emu::launch. Built and loaded by tests/emulation/loader.py.
//
// Extra test hooks (no counterpart in bertkern):
//   bertkern_emu::_set_row_block_cap(int cap) -> int   caps the row kernels' grid at `cap`
//     blocks (0: the real plan) and returns the previous cap, so a small M runs the grid-stride
//     loop over rows that the GPU only takes for large M (and, in the backward, blocks that
//     sum dweight / dbias over several rows).
//   bertkern_emu::_layer_norm_last_plan(bool backward) -> int[]   the plan of the last forward
//     (backward) call: [registers, vec, iters, threads_x, rows_y, blocks, n_partials, launches]
//     (all 0: nothing launched).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include "schemas.h"

#include <cmath>
#include <mutex>
#include <tuple>
#include <vector>

#include "emu_launcher.h"  // first: cuda_host_emu.h
#include "cuda/layer_norm_launch.cuh"
#include "layer_norm_common.h"

namespace {

using bertkern::cuda::LayerNormPlan;

emu_plans::GridCap row_block_cap;
std::mutex plan_mutex;
std::vector<int64_t> last_plan[2] = {std::vector<int64_t>(8, 0), std::vector<int64_t>(8, 0)};

int64_t max_blocks() { return row_block_cap.or_real(bertkern::cuda::kMaxRowBlocks); }

void record_plan(bool backward, const LayerNormPlan* plan, size_t n_launches) {
  std::lock_guard<std::mutex> lock(plan_mutex);
  if (plan == nullptr) {
    last_plan[backward] = std::vector<int64_t>(8, 0);
    return;
  }
  last_plan[backward] = {plan->registers, plan->vec, plan->iters, plan->threads_x, plan->rows_y,
                         plan->blocks, plan->n_partials, static_cast<int64_t>(n_launches)};
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// The storage types the CUDA kernels are instantiated for.
template <typename F>
void dispatch_storage_type(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat:
      f(float{});
      return;
    case at::kHalf:
      f(c10::Half{});
      return;
    case at::kBFloat16:
      f(c10::BFloat16{});
      return;
    default:
      TORCH_CHECK_TYPE(false, op, ": the CUDA kernels support float32, float16 and bfloat16, got ", t);
  }
}

template <typename T>
const T* data_or_null(const c10::optional<at::Tensor>& t) {
  return t ? t->data_ptr<T>() : nullptr;
}

c10::optional<at::Tensor> contiguous(const c10::optional<at::Tensor>& t) {
  if (!t) return c10::nullopt;
  return t->contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& residual_in,
    const c10::optional<at::Tensor>& weight_in, const c10::optional<at::Tensor>& bias_in, double eps,
    bool store_residual) {
  bertkern::check_layer_norm_fwd(x_in, residual_in, weight_in, bias_in, eps);
  const at::Tensor x = x_in.contiguous();
  const auto residual = contiguous(residual_in);
  const auto weight = contiguous(weight_in);
  const auto bias = contiguous(bias_in);
  const int64_t N = x.size(-1);
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);

  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor residual_out =
      residual && store_residual ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  const auto stat_options = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty(bertkern::row_shape(x), stat_options);
  at::Tensor rstd = at::empty(bertkern::row_shape(x), stat_options);
  record_plan(false, nullptr, 0);
  dispatch_storage_type(x.scalar_type(), "layer_norm_fwd", [&](auto tag) {
    using T = decltype(tag);
    if (M == 0) return;
    if (N == 0) {  // empty rows: mean 0, variance 0
      mean.fill_(0.0);
      rstd.fill_(1.0 / std::sqrt(eps));  // as layer_norm.cu: in double, stored as float
      return;
    }
    const T* r = data_or_null<T>(residual);
    const T* w = data_or_null<T>(weight);
    const T* b = data_or_null<T>(bias);
    T* z = residual && store_residual ? residual_out.data_ptr<T>() : nullptr;
    const bool all_aligned = aligned16(x.data_ptr()) && aligned16(y.data_ptr()) && aligned16(r) &&
                             aligned16(w) && aligned16(b) && aligned16(z);
    const LayerNormPlan plan =
        bertkern::cuda::layer_norm_fwd_plan(M, N, sizeof(T), all_aligned, max_blocks());
    std::vector<emu_plans::LaunchRecord> launches;
    bertkern::cuda::layer_norm_fwd_launch<T>(emu_plans::EmuLauncher{&launches}, plan, x.data_ptr<T>(),
                                             r, w, b, y.data_ptr<T>(), z, mean.data_ptr<float>(),
                                             rstd.data_ptr<float>(), M, N, static_cast<float>(eps));
    record_plan(false, &plan, launches.size());
  });
  return {y, residual_out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(
    const at::Tensor& dy_in, const c10::optional<at::Tensor>& dresidual_out_in,
    const at::Tensor& z_in, const at::Tensor& mean_in, const at::Tensor& rstd_in,
    const c10::optional<at::Tensor>& weight_in, bool has_bias) {
  bertkern::check_layer_norm_bwd(dy_in, dresidual_out_in, z_in, mean_in, rstd_in, weight_in);
  const at::Tensor z = z_in.contiguous();
  const at::Tensor dy = dy_in.contiguous();
  const auto dresidual_out = contiguous(dresidual_out_in);
  const auto weight = contiguous(weight_in);
  const at::Tensor mean = mean_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  const int64_t N = z.size(-1);
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < z.dim(); ++d) M *= z.size(d);

  at::Tensor dz = at::empty(z.sizes(), z.options());
  at::Tensor dweight = at::empty({weight ? N : 0}, z.options());
  at::Tensor dbias = at::empty({has_bias ? N : 0}, z.options());
  record_plan(true, nullptr, 0);
  dispatch_storage_type(z.scalar_type(), "layer_norm_bwd", [&](auto tag) {
    using T = decltype(tag);
    if (M == 0) {  // sums over no rows
      dweight.zero_();
      dbias.zero_();
      return;
    }
    if (N == 0) return;
    const T* w = data_or_null<T>(weight);
    const T* dr = data_or_null<T>(dresidual_out);
    const bool all_aligned = aligned16(dy.data_ptr()) && aligned16(z.data_ptr()) &&
                             aligned16(dz.data_ptr()) && aligned16(w) && aligned16(dr);
    const LayerNormPlan plan = bertkern::cuda::layer_norm_bwd_plan(
        M, N, sizeof(T), all_aligned, weight.has_value() || has_bias, max_blocks());
    // Garbage-filled like the GPU's uninitialized workspace: every partial must be written.
    std::vector<float> workspace(static_cast<size_t>(plan.workspace_floats), std::nanf(""));
    std::vector<emu_plans::LaunchRecord> launches;
    bertkern::cuda::layer_norm_bwd_launch<T>(
        emu_plans::EmuLauncher{&launches}, plan, plan.workspace_floats ? workspace.data() : nullptr,
        dy.data_ptr<T>(), dr, z.data_ptr<T>(), mean.data_ptr<float>(), rstd.data_ptr<float>(), w,
        dz.data_ptr<T>(), weight ? dweight.data_ptr<T>() : nullptr,
        has_bias ? dbias.data_ptr<T>() : nullptr, M, N);
    record_plan(true, &plan, launches.size());
  });
  return {dz, dweight, dbias};
}

int64_t set_row_block_cap(int64_t cap) {
  TORCH_CHECK_VALUE(cap >= 0, "_set_row_block_cap: cap must be >= 0, got ", cap);
  return row_block_cap.exchange(cap);
}

std::vector<int64_t> layer_norm_last_plan(bool backward) {
  std::lock_guard<std::mutex> lock(plan_mutex);
  return last_plan[backward];
}

}  // namespace

TORCH_LIBRARY(bertkern_emu, m) {
  m.def(bertkern::schema::kLayerNormFwd);  // csrc/schemas.h: the bertkern operators' own schemas
  m.def(bertkern::schema::kLayerNormBwd);
  m.def("_set_row_block_cap(int cap) -> int", &set_row_block_cap);
  m.def("_layer_norm_last_plan(bool backward) -> int[]", &layer_norm_last_plan);
}

TORCH_LIBRARY_IMPL(bertkern_emu, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
}
