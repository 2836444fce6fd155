// CUDA launchers for key-padding masking: mask -> indices / cu_seqlens, row gather / scatter.
// Launch plans live in padding_launch.cuh (shared with the host emulation), kernels in
// padding.cuh; argument checks shared with the CPU twin in padding_common.h.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include "cuda/padding_launch.cuh"
#include "cuda/stream_launch.cuh"
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
  const StreamLauncher launch{stream};
  mask_lengths_launch(launch, mask.data_ptr<bool>(), seqlens.data_ptr<int32_t>(),
                      cu_seqlens.data_ptr<int32_t>(), stats.data_ptr<int64_t>(), B, S);
  // The packed length sizes the output: one small device-to-host copy (a sync), as any
  // nonzero() has. Under torch.compile the fake returns a dynamic size instead.
  const at::Tensor host_stats = stats.cpu();
  const int64_t total = host_stats[0].item<int64_t>();
  const int64_t max_seqlen = host_stats[1].item<int64_t>();
  TORCH_CHECK_VALUE(total <= INT32_MAX, "key_padding_mask: ", total,
                    " real tokens, more than 2^31 - 1; cu_seqlens is int32");
  at::Tensor indices = at::empty({total}, mask.options().dtype(at::kLong));
  if (total > 0) {
    mask_indices_launch(launch, mask.data_ptr<bool>(), cu_seqlens.data_ptr<int32_t>(),
                        indices.data_ptr<int64_t>(), B, S);
  }
  return {indices, cu_seqlens, c10::SymInt(max_seqlen)};
}

int64_t row_bytes_of(const at::Tensor& x) {
  return c10::multiply_integers(x.sizes().slice(1)) * x.element_size();
}

at::Tensor gather_rows_cuda(const at::Tensor& x_in, const at::Tensor& indices_in) {
  check_rows_args(x_in, indices_in, "gather_rows", "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  auto shape = x.sizes().vec();
  shape[0] = indices.numel();
  at::Tensor out = at::empty(shape, x.options());
  // Row copies move raw bytes: the unit depends on the row size and alignment only, so every
  // dtype works.
  gather_rows_launch(StreamLauncher{c10::cuda::getCurrentCUDAStream()}, x.data_ptr(),
                     indices.data_ptr<int64_t>(), out.data_ptr(), indices.numel(), x.size(0),
                     row_bytes_of(x));
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
  // No zero-fill: every output row is written once, with its packed row or zeros.
  at::Tensor out = at::empty(shape, x.options());
  const int64_t row_bytes = row_bytes_of(x);
  at::Tensor inverse = at::empty({row_bytes > 0 ? n_rows : 0}, indices.options());
  scatter_rows_launch(StreamLauncher{c10::cuda::getCurrentCUDAStream()}, x.data_ptr(),
                      indices.data_ptr<int64_t>(), out.data_ptr(), inverse.data_ptr<int64_t>(),
                      indices.numel(), n_rows, row_bytes);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bertkern, CUDA, m) {
  m.impl("mask_to_indices", &mask_to_indices_cuda);
  m.impl("gather_rows", &gather_rows_cuda);
  m.impl("scatter_rows", &scatter_rows_cuda);
}

}  // namespace bertkern
