// Test-only torch extension, part 2: the key-padding CUDA kernels of csrc/cuda/padding.cuh,
// compiled with g++ against the CUDA host emulation and registered for CPU tensors under
// bertkern_emu with the same schemas as the real ops (csrc/ops.cpp). Each op does what the CUDA
// launcher csrc/cuda/padding.cu does (argument checks from padding_common.h, output allocation,
// special cases) and runs the real launch plans (csrc/cuda/padding_launch.cuh) on CPU tensors
// through emu::launch. Indices
// are NOT range-checked on the host (padding.cu does not either): an out-of-range index fails
// the kernels' device-side check, and the op raises IndexError with its message.
//
// Extra test hooks (no counterpart in bertkern):
//   bertkern_emu::_set_padding_block_cap(int cap) -> int   caps every padding kernel's grid at
//     `cap` blocks (0: the real plan), returns the previous cap: small inputs then run the
//     grid-stride loops over sequences and rows.
//   bertkern_emu::_padding_last_row_copy() -> int[]   [unit_bytes, VEC, threads_x, rows_y,
//     blocks] of the last gather_rows row copy / scatter_rows pad_rows launch ([0, 0, 0, 0, 0]:
//     it launched none), so tests can see which copy path ran.
//
// Like bertkern's own extension, it uses libtorch only through csrc/torch_api.h (the stable ABI;
// loader.py passes TORCH_TARGET_VERSION).
#include "schemas.h"
#include "torch_api.h"

#include <cstring>
#include <mutex>
#include <tuple>
#include <vector>

#include "emu_launcher.h"  // first: cuda_host_emu.h
#include "cuda/padding_launch.cuh"
#include "padding_common.h"

namespace {

using bertkern::Tensor;
using bertkern::cuda::RowCopyInfo;

emu_plans::GridCap block_cap;

int64_t max_blocks() { return block_cap.or_real(bertkern::cuda::kMaxPaddingBlocks); }

std::mutex last_copy_mutex;
std::vector<int64_t> last_copy(5, 0);

void record_copy(const RowCopyInfo& info) {
  std::lock_guard<std::mutex> lock(last_copy_mutex);
  last_copy = {info.unit_bytes, info.vec, info.plan.threads_x, info.plan.rows_y, info.plan.blocks};
}

// Runs an emulated launch sequence and turns the GPU-side failures into Python errors: a failed
// device-side check -> IndexError (the only checks are index ranges), a misaligned pack access
// -> RuntimeError (as the CUDA error would be).
template <typename F>
auto run_emulated(const char* op, F&& f) {
  try {
    return f();
  } catch (const emu::DeviceCheckError& e) {
    BERTKERN_CHECK_INDEX(false, op, ": ", e.what());
  } catch (const emu_plans::MisalignedAddress& e) {
    BERTKERN_CHECK(false, op, ": CUDA error: ", e.what());
  }
}

// max_seqlen: the schema's SymInt output, returned as an int (as padding.cu does).
std::tuple<Tensor, Tensor, int64_t> mask_to_indices(const Tensor& mask_in) {
  bertkern::check_key_padding_mask(mask_in);
  const Tensor mask = bertkern::as_contiguous(mask_in);
  const int64_t B = mask.size(0), S = mask.size(1);
  Tensor cu_seqlens = bertkern::empty({B + 1}, bertkern::kInt, mask.device());
  const bool* m = bertkern::const_data<bool>(mask);
  const int64_t cap = max_blocks();
  int64_t stats[2] = {0, 0};  // T, max seqlen
  if (B == 0) {  // padding.cu: cu_seqlens.zero_(), no launch
    torch::stable::zero_(cu_seqlens);
  } else {
    Tensor seqlens = bertkern::empty({B}, bertkern::kInt, mask.device());
    run_emulated("mask_to_indices", [&] {
      bertkern::cuda::mask_lengths_launch(emu_plans::EmuLauncher{}, m,
                                          bertkern::data<int32_t>(seqlens),
                                          bertkern::data<int32_t>(cu_seqlens), stats, B, S, cap);
      return 0;
    });
  }
  BERTKERN_CHECK_VALUE(stats[0] <= INT32_MAX, "key_padding_mask: ", stats[0],
                       " real tokens, more than 2^31 - 1; cu_seqlens is int32");
  Tensor indices = bertkern::empty({stats[0]}, bertkern::kLong, mask.device());
  if (stats[0] > 0) {
    run_emulated("mask_to_indices", [&] {
      bertkern::cuda::mask_indices_launch(emu_plans::EmuLauncher{}, m,
                                          bertkern::const_data<int32_t>(cu_seqlens),
                                          bertkern::data<int64_t>(indices), B, S, cap);
      return 0;
    });
  }
  return {indices, cu_seqlens, stats[1]};
}

int64_t row_bytes_of(const Tensor& x) {
  int64_t elems = 1;
  for (int64_t d = 1; d < x.dim(); ++d) elems *= x.size(d);
  return elems * static_cast<int64_t>(x.element_size());
}

Tensor gather_rows(const Tensor& x_in, const Tensor& indices_in) {
  bertkern::check_rows_args(x_in, indices_in, "gather_rows", "x");
  const Tensor x = bertkern::as_contiguous(x_in);
  const Tensor indices = bertkern::as_contiguous(indices_in);
  std::vector<int64_t> shape = bertkern::shape(x);
  shape[0] = indices.numel();
  Tensor out = bertkern::empty(shape, x.scalar_type(), x.device());
  const auto info = run_emulated("gather_rows", [&] {
    return bertkern::cuda::gather_rows_launch(emu_plans::EmuLauncher{}, x.const_data_ptr(),
                                              bertkern::const_data<int64_t>(indices),
                                              out.mutable_data_ptr(), indices.numel(), x.size(0),
                                              row_bytes_of(x), max_blocks());
  });
  record_copy(info);
  return out;
}

Tensor scatter_rows(const Tensor& x_in, const Tensor& indices_in, int64_t n_rows) {
  bertkern::check_rows_args(x_in, indices_in, "scatter_rows", "x_packed");
  bertkern::check_scatter_rows(x_in, indices_in, n_rows);
  const Tensor x = bertkern::as_contiguous(x_in);
  const Tensor indices = bertkern::as_contiguous(indices_in);
  std::vector<int64_t> shape = bertkern::shape(x);
  shape[0] = n_rows;
  // As padding.cu: no zero-fill (the fill below is garbage the kernels must overwrite).
  Tensor out = bertkern::empty(shape, x.scalar_type(), x.device());
  if (out.numel() > 0) {
    std::memset(out.mutable_data_ptr(), 0xA5,
                static_cast<size_t>(out.numel()) * out.element_size());
  }
  const int64_t row_bytes = row_bytes_of(x);
  Tensor inverse =
      bertkern::empty({row_bytes > 0 ? n_rows : 0}, indices.scalar_type(), indices.device());
  const auto info = run_emulated("scatter_rows", [&] {
    return bertkern::cuda::scatter_rows_launch(emu_plans::EmuLauncher{}, x.const_data_ptr(),
                                               bertkern::const_data<int64_t>(indices),
                                               out.mutable_data_ptr(),
                                               bertkern::data<int64_t>(inverse), indices.numel(),
                                               n_rows, row_bytes, max_blocks());
  });
  record_copy(info);
  return out;
}

int64_t set_padding_block_cap(int64_t cap) {
  BERTKERN_CHECK_VALUE(cap >= 0, "_set_padding_block_cap: cap must be >= 0, got ", cap);
  return block_cap.exchange(cap);
}

std::vector<int64_t> padding_last_row_copy() {
  std::lock_guard<std::mutex> lock(last_copy_mutex);
  return last_copy;
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(bertkern_emu, m) {
  m.def(bertkern::schema::kMaskToIndices);  // csrc/schemas.h
  m.def(bertkern::schema::kGatherRows);
  m.def(bertkern::schema::kScatterRows);
  m.def("_set_padding_block_cap(int cap) -> int");
  m.def("_padding_last_row_copy() -> int[]");
}

STABLE_TORCH_LIBRARY_IMPL(bertkern_emu, CPU, m) {
  m.impl("mask_to_indices", TORCH_BOX(&mask_to_indices));
  m.impl("gather_rows", TORCH_BOX(&gather_rows));
  m.impl("scatter_rows", TORCH_BOX(&scatter_rows));
}

// The hooks take no tensor: CompositeExplicitAutograd serves every call (emulated_layer_norm.cpp).
STABLE_TORCH_LIBRARY_IMPL(bertkern_emu, CompositeExplicitAutograd, m) {
  m.impl("_set_padding_block_cap", TORCH_BOX(&set_padding_block_cap));
  m.impl("_padding_last_row_copy", TORCH_BOX(&padding_last_row_copy));
}
