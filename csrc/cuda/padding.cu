// CUDA launchers for key-padding masking: mask -> indices / cu_seqlens, row gather / scatter.
// Launch plans live in padding_launch.cuh (shared with the host emulation), kernels in
// padding.cuh; argument checks shared with the CPU twin in padding_common.h. libtorch only
// through torch_api.h (the stable ABI).
#include <torch/csrc/stable/accelerator.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "cuda/padding_launch.cuh"
#include "cuda/stream_launch.cuh"
#include "padding_common.h"
#include "torch_api.h"

namespace bertkern {
namespace {

using namespace bertkern::cuda;
using torch::stable::accelerator::DeviceGuard;

// max_seqlen: the schema's SymInt output, returned as an int.
std::tuple<Tensor, Tensor, int64_t> mask_to_indices_cuda(const Tensor& mask_in) {
  check_key_padding_mask(mask_in);
  const DeviceGuard guard(mask_in.get_device_index());
  const Tensor mask = as_contiguous(mask_in);
  const int64_t B = mask.size(0), S = mask.size(1);
  Tensor cu_seqlens = empty({B + 1}, kInt, mask.device());
  if (B == 0) {
    torch::stable::zero_(cu_seqlens);
    return {empty({0}, kLong, mask.device()), cu_seqlens, 0};
  }
  const cudaStream_t stream = current_stream(mask);
  Tensor seqlens = empty({B}, kInt, mask.device());
  Tensor stats = empty({2}, kLong, mask.device());
  const StreamLauncher launch{stream};
  mask_lengths_launch(launch, const_data<bool>(mask), data<int32_t>(seqlens),
                      data<int32_t>(cu_seqlens), data<int64_t>(stats), B, S);
  // The packed length sizes the output: one small device-to-host copy (a sync), as any
  // nonzero() has. Under torch.compile the fake returns a dynamic size instead.
  const Tensor host_stats = to_cpu(stats);
  const int64_t total = const_data<int64_t>(host_stats)[0];
  const int64_t max_seqlen = const_data<int64_t>(host_stats)[1];
  BERTKERN_CHECK_VALUE(total <= INT32_MAX, "key_padding_mask: ", total,
                       " real tokens, more than 2^31 - 1; cu_seqlens is int32");
  Tensor indices = empty({total}, kLong, mask.device());
  if (total > 0) {
    mask_indices_launch(launch, const_data<bool>(mask), const_data<int32_t>(cu_seqlens),
                        data<int64_t>(indices), B, S);
  }
  return {indices, cu_seqlens, max_seqlen};
}

int64_t row_bytes_of(const Tensor& x) {
  int64_t elems = 1;
  for (int64_t d = 1; d < x.dim(); ++d) elems *= x.size(d);
  return elems * static_cast<int64_t>(x.element_size());
}

Tensor gather_rows_cuda(const Tensor& x_in, const Tensor& indices_in) {
  check_rows_args(x_in, indices_in, "gather_rows", "x");
  const DeviceGuard guard(x_in.get_device_index());
  const Tensor x = as_contiguous(x_in);
  const Tensor indices = as_contiguous(indices_in);
  std::vector<int64_t> out_shape = shape(x);
  out_shape[0] = indices.numel();
  Tensor out = empty(out_shape, x.scalar_type(), x.device());
  // Row copies move raw bytes: the unit depends on the row size and alignment only, so every
  // dtype works.
  gather_rows_launch(StreamLauncher{current_stream(x)}, x.const_data_ptr(),
                     const_data<int64_t>(indices), out.mutable_data_ptr(), indices.numel(),
                     x.size(0), row_bytes_of(x));
  return out;
}

Tensor scatter_rows_cuda(const Tensor& x_in, const Tensor& indices_in, int64_t n_rows) {
  check_rows_args(x_in, indices_in, "scatter_rows", "x_packed");
  check_scatter_rows(x_in, indices_in, n_rows);
  const DeviceGuard guard(x_in.get_device_index());
  const Tensor x = as_contiguous(x_in);
  const Tensor indices = as_contiguous(indices_in);
  std::vector<int64_t> out_shape = shape(x);
  out_shape[0] = n_rows;
  // No zero-fill: every output row is written once, with its packed row or zeros.
  Tensor out = empty(out_shape, x.scalar_type(), x.device());
  const int64_t row_bytes = row_bytes_of(x);
  Tensor inverse = empty({row_bytes > 0 ? n_rows : 0}, indices.scalar_type(), indices.device());
  scatter_rows_launch(StreamLauncher{current_stream(x)}, x.const_data_ptr(),
                      const_data<int64_t>(indices), out.mutable_data_ptr(), data<int64_t>(inverse),
                      indices.numel(), n_rows, row_bytes);
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(bertkern, CUDA, m) {
  m.impl("mask_to_indices", TORCH_BOX(&mask_to_indices_cuda));
  m.impl("gather_rows", TORCH_BOX(&gather_rows_cuda));
  m.impl("scatter_rows", TORCH_BOX(&scatter_rows_cuda));
}

}  // namespace bertkern
