// CUDA launchers for key-padding masking: mask -> indices / cu_seqlens, row gather / scatter.
// Kernels live in padding.cuh; argument checks shared with the CPU twin in padding_common.h.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include "cuda/padding.cuh"
#include "padding_common.h"

namespace bertkern {
namespace {

using namespace bertkern::cuda;

std::tuple<at::Tensor, at::Tensor, c10::SymInt> mask_to_indices_cuda(const at::Tensor& mask_in) {
  check_key_padding_mask(mask_in);
  const c10::cuda::CUDAGuard guard(mask_in.device());
  const at::Tensor mask = mask_in.contiguous();
  const int64_t B = mask.size(0), S = mask.size(1);
  const auto i32 = mask.options().dtype(at::kInt);
  at::Tensor cu_seqlens = at::empty({B + 1}, i32);
  if (B == 0) {
    cu_seqlens.zero_();
    return {at::empty({0}, mask.options().dtype(at::kLong)), cu_seqlens, c10::SymInt(0)};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor seqlens = at::empty({B}, i32);
  at::Tensor stats = at::empty({2}, mask.options().dtype(at::kLong));
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(B, 65536)));
  const dim3 block(mask_scan_threads(S));
  mask_seqlens_kernel<<<grid, block, 0, stream>>>(mask.data_ptr<bool>(), seqlens.data_ptr<int32_t>(), B, S);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  cu_seqlens_kernel<<<1, kCuSeqlensThreads, 0, stream>>>(seqlens.data_ptr<int32_t>(),
                                                         cu_seqlens.data_ptr<int32_t>(),
                                                         stats.data_ptr<int64_t>(), B);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // The packed length sizes the output: one small device-to-host copy (a sync), as any
  // nonzero() has. Under torch.compile the fake returns a dynamic size instead.
  const at::Tensor host_stats = stats.cpu();
  const int64_t total = host_stats[0].item<int64_t>();
  const int64_t max_seqlen = host_stats[1].item<int64_t>();
  TORCH_CHECK_VALUE(total <= INT32_MAX, "key_padding_mask: ", total,
                    " real tokens, more than 2^31 - 1; cu_seqlens is int32");
  at::Tensor indices = at::empty({total}, mask.options().dtype(at::kLong));
  if (total > 0) {
    mask_indices_kernel<<<grid, block, 0, stream>>>(mask.data_ptr<bool>(), cu_seqlens.data_ptr<int32_t>(),
                                                    indices.data_ptr<int64_t>(), B, S);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {indices, cu_seqlens, c10::SymInt(max_seqlen)};
}

// Row copies move raw bytes: dispatch on the element size only, so every dtype works.
template <bool kScatter>
void copy_rows_cuda(const at::Tensor& src, const at::Tensor& indices, at::Tensor& dst) {
  const int64_t n = indices.numel();
  const int64_t row_bytes = c10::multiply_integers(src.sizes().slice(1)) * src.element_size();
  // A gather from an empty x with indices still launches, so the device-side check reports them.
  if (n == 0 || row_bytes == 0) return;
  const int64_t n_src = src.size(0), n_dst = dst.size(0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto unit, auto vec_constant) {
    using T = decltype(unit);
    constexpr int VEC = decltype(vec_constant)::value;
    const int64_t n_packs = row_bytes / static_cast<int64_t>(sizeof(T) * VEC);
    const RowCopyPlan plan = row_copy_plan(n, n_packs);
    const dim3 grid(static_cast<unsigned>(plan.blocks)), block(plan.threads_x, plan.rows_y);
    const T* s = static_cast<const T*>(src.data_ptr());
    T* d = static_cast<T*>(dst.data_ptr());
    if constexpr (kScatter) {
      scatter_rows_kernel<T, VEC><<<grid, block, 0, stream>>>(s, indices.data_ptr<int64_t>(), d, n, n_dst, n_packs);
    } else {
      gather_rows_kernel<T, VEC><<<grid, block, 0, stream>>>(s, indices.data_ptr<int64_t>(), d, n, n_src, n_packs);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (row_copy_unit(reinterpret_cast<uintptr_t>(src.data_ptr()),
                        reinterpret_cast<uintptr_t>(dst.data_ptr()), row_bytes)) {
    case 16: launch(uint32_t{}, std::integral_constant<int, 4>{}); break;
    case 4: launch(uint32_t{}, std::integral_constant<int, 1>{}); break;
    case 2: launch(uint16_t{}, std::integral_constant<int, 1>{}); break;
    default: launch(uint8_t{}, std::integral_constant<int, 1>{}); break;
  }
}

at::Tensor gather_rows_cuda(const at::Tensor& x_in, const at::Tensor& indices_in) {
  check_rows_args(x_in, indices_in, "gather_rows", "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  auto shape = x.sizes().vec();
  shape[0] = indices.numel();
  at::Tensor out = at::empty(shape, x.options());
  copy_rows_cuda<false>(x, indices, out);
  return out;
}

at::Tensor scatter_rows_cuda(const at::Tensor& x_in, const at::Tensor& indices_in, int64_t n_rows) {
  check_rows_args(x_in, indices_in, "scatter_rows", "x_packed");
  check_scatter_rows(x_in, indices_in, n_rows);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  auto shape = x.sizes().vec();
  shape[0] = n_rows;
  at::Tensor out = at::zeros(shape, x.options());
  copy_rows_cuda<true>(x, indices, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bertkern, CUDA, m) {
  m.impl("mask_to_indices", &mask_to_indices_cuda);
  m.impl("gather_rows", &gather_rows_cuda);
  m.impl("scatter_rows", &scatter_rows_cuda);
}

}  // namespace bertkern
