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
//
// Like bertkern's own extension, it uses libtorch only through csrc/torch_api.h (the stable ABI;
// loader.py passes TORCH_TARGET_VERSION).
#include "schemas.h"
#include "torch_api.h"

#include <cmath>
#include <mutex>
#include <tuple>
#include <vector>

#include "emu_launcher.h"  // first: cuda_host_emu.h
#include "cuda/layer_norm_launch.cuh"
#include "layer_norm_common.h"

namespace {

using bertkern::OptionalTensor;
using bertkern::Tensor;
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
void dispatch_storage_type(bertkern::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case bertkern::kFloat:
      f(float{});
      return;
    case bertkern::kHalf:
      f(bertkern::Half{});
      return;
    case bertkern::kBFloat16:
      f(bertkern::BFloat16{});
      return;
    default:
      BERTKERN_CHECK_TYPE(false, op, ": the CUDA kernels support float32, float16 and bfloat16, got ", t);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_fwd(
    const Tensor& x_in, const OptionalTensor& residual_in, const OptionalTensor& weight_in,
    const OptionalTensor& bias_in, double eps, bool store_residual) {
  bertkern::check_layer_norm_fwd(x_in, residual_in, weight_in, bias_in, eps);
  const Tensor x = bertkern::as_contiguous(x_in);
  const OptionalTensor residual = bertkern::as_contiguous(residual_in);
  const OptionalTensor weight = bertkern::as_contiguous(weight_in);
  const OptionalTensor bias = bertkern::as_contiguous(bias_in);
  const int64_t N = x.size(-1);
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);

  Tensor y = bertkern::empty(x.sizes(), x.scalar_type(), x.device());
  Tensor residual_out = residual && store_residual
                            ? bertkern::empty(x.sizes(), x.scalar_type(), x.device())
                            : bertkern::empty({0}, x.scalar_type(), x.device());
  Tensor mean = bertkern::empty(bertkern::row_shape(x), bertkern::kFloat, x.device());
  Tensor rstd = bertkern::empty(bertkern::row_shape(x), bertkern::kFloat, x.device());
  record_plan(false, nullptr, 0);
  dispatch_storage_type(x.scalar_type(), "layer_norm_fwd", [&](auto tag) {
    using T = decltype(tag);
    if (M == 0) return;
    if (N == 0) {  // empty rows: mean 0, variance 0
      torch::stable::fill_(mean, 0.0);
      torch::stable::fill_(rstd, 1.0 / std::sqrt(eps));  // as layer_norm.cu: in double, stored as float
      return;
    }
    const T* r = bertkern::const_data_or_null<T>(residual);
    const T* w = bertkern::const_data_or_null<T>(weight);
    const T* b = bertkern::const_data_or_null<T>(bias);
    T* z = residual && store_residual ? bertkern::data<T>(residual_out) : nullptr;
    const bool all_aligned = aligned16(x.data_ptr()) && aligned16(y.data_ptr()) && aligned16(r) &&
                             aligned16(w) && aligned16(b) && aligned16(z);
    const LayerNormPlan plan =
        bertkern::cuda::layer_norm_fwd_plan(M, N, sizeof(T), all_aligned, max_blocks());
    std::vector<emu_plans::LaunchRecord> launches;
    bertkern::cuda::layer_norm_fwd_launch<T>(
        emu_plans::EmuLauncher{&launches}, plan, bertkern::const_data<T>(x), r, w, b,
        bertkern::data<T>(y), z, bertkern::data<float>(mean), bertkern::data<float>(rstd), M, N,
        static_cast<float>(eps));
    record_plan(false, &plan, launches.size());
  });
  return {y, residual_out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd(
    const Tensor& dy_in, const OptionalTensor& dresidual_out_in, const Tensor& z_in,
    const Tensor& mean_in, const Tensor& rstd_in, const OptionalTensor& weight_in, bool has_bias) {
  bertkern::check_layer_norm_bwd(dy_in, dresidual_out_in, z_in, mean_in, rstd_in, weight_in);
  const Tensor z = bertkern::as_contiguous(z_in);
  const Tensor dy = bertkern::as_contiguous(dy_in);
  const OptionalTensor dresidual_out = bertkern::as_contiguous(dresidual_out_in);
  const OptionalTensor weight = bertkern::as_contiguous(weight_in);
  const Tensor mean = bertkern::as_contiguous(mean_in);
  const Tensor rstd = bertkern::as_contiguous(rstd_in);
  const int64_t N = z.size(-1);
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < z.dim(); ++d) M *= z.size(d);

  Tensor dz = bertkern::empty(z.sizes(), z.scalar_type(), z.device());
  Tensor dweight = bertkern::empty({weight ? N : 0}, z.scalar_type(), z.device());
  Tensor dbias = bertkern::empty({has_bias ? N : 0}, z.scalar_type(), z.device());
  record_plan(true, nullptr, 0);
  dispatch_storage_type(z.scalar_type(), "layer_norm_bwd", [&](auto tag) {
    using T = decltype(tag);
    if (M == 0) {  // sums over no rows
      torch::stable::zero_(dweight);
      torch::stable::zero_(dbias);
      return;
    }
    if (N == 0) return;
    const T* w = bertkern::const_data_or_null<T>(weight);
    const T* dr = bertkern::const_data_or_null<T>(dresidual_out);
    const bool all_aligned = aligned16(dy.data_ptr()) && aligned16(z.data_ptr()) &&
                             aligned16(dz.data_ptr()) && aligned16(w) && aligned16(dr);
    const LayerNormPlan plan = bertkern::cuda::layer_norm_bwd_plan(
        M, N, sizeof(T), all_aligned, weight.has_value() || has_bias, max_blocks());
    // Garbage-filled like the GPU's uninitialized workspace: every partial must be written.
    std::vector<float> workspace(static_cast<size_t>(plan.workspace_floats), std::nanf(""));
    std::vector<emu_plans::LaunchRecord> launches;
    bertkern::cuda::layer_norm_bwd_launch<T>(
        emu_plans::EmuLauncher{&launches}, plan, plan.workspace_floats ? workspace.data() : nullptr,
        bertkern::const_data<T>(dy), dr, bertkern::const_data<T>(z),
        bertkern::const_data<float>(mean), bertkern::const_data<float>(rstd), w,
        bertkern::data<T>(dz), weight ? bertkern::data<T>(dweight) : nullptr,
        has_bias ? bertkern::data<T>(dbias) : nullptr, M, N);
    record_plan(true, &plan, launches.size());
  });
  return {dz, dweight, dbias};
}

int64_t set_row_block_cap(int64_t cap) {
  BERTKERN_CHECK_VALUE(cap >= 0, "_set_row_block_cap: cap must be >= 0, got ", cap);
  return row_block_cap.exchange(cap);
}

std::vector<int64_t> layer_norm_last_plan(bool backward) {
  std::lock_guard<std::mutex> lock(plan_mutex);
  return last_plan[backward];
}

}  // namespace

STABLE_TORCH_LIBRARY(bertkern_emu, m) {
  m.def(bertkern::schema::kLayerNormFwd);  // csrc/schemas.h: the bertkern operators' own schemas
  m.def(bertkern::schema::kLayerNormBwd);
  m.def("_set_row_block_cap(int cap) -> int");
  m.def("_layer_norm_last_plan(bool backward) -> int[]");
}

STABLE_TORCH_LIBRARY_IMPL(bertkern_emu, CPU, m) {
  m.impl("layer_norm_fwd", TORCH_BOX(&layer_norm_fwd));
  m.impl("layer_norm_bwd", TORCH_BOX(&layer_norm_bwd));
}

// The hooks take no tensor, so no backend key selects a kernel: CompositeExplicitAutograd
// serves every call (as the catch-all kernel that m.def(schema, fn) registered did).
STABLE_TORCH_LIBRARY_IMPL(bertkern_emu, CompositeExplicitAutograd, m) {
  m.impl("_set_row_block_cap", TORCH_BOX(&set_row_block_cap));
  m.impl("_layer_norm_last_plan", TORCH_BOX(&layer_norm_last_plan));
}
