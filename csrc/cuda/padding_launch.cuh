// Launch plans of the key-padding kernels (padding.cuh), written once: padding.cu runs them on
// the GPU through StreamLauncher (stream_launch.cuh), the host emulation (tests/emulation/)
// through emu::launch. A launcher is a callable `launch(dim3 grid, dim3 block, kernel,
// args...)` with a `check_aligned(ptr, bytes, what)` (the GPU needs a pack's address aligned to
// the pack; the plans only pick such packs, the emulation checks it). No ATen: callers
// allocate outputs and workspaces, and do the one device-to-host read of mask_to_indices.
//
//   mask_to_indices: B == 0: cu_seqlens = {0}, no launch (the caller). Else
//     mask_lengths_launch: mask_seqlens_kernel on grid min(B, max_blocks), block
//       mask_scan_threads(S); cu_seqlens_kernel on 1 block of kCuSeqlensThreads;
//     the caller reads stats (T, max_seqlen) back;
//     mask_indices_launch (T > 0): mask_indices_kernel on the first kernel's grid and block.
//   gather_rows_launch: no launch when T == 0 or the rows are empty. Unit and VEC from the row's
//     byte count and both data pointers (row_copy_unit): 16 -> (uint32, 4), 4 -> (uint32, 1),
//     2 -> (uint16, 1), 1 -> (uint8, 1); plan = row_copy_plan(T, row_bytes / (unit * VEC)),
//     grid plan.blocks (<= max_blocks), block (plan.threads_x, plan.rows_y).
//   scatter_rows_launch: no launch when the rows are empty. Otherwise (workspace: n_dst int64)
//     fill_inverse_kernel and invert_indices_kernel (kIndexThreads-thread blocks, skipped for
//     n_dst == 0 / T == 0), then pad_rows_kernel over the n_dst output rows with the same unit /
//     VEC choice and row_copy_plan(n_dst, packs): each output row is written once, with its
//     source row or zeros (no zero-fill pass: 1 read + 1 write of the rows, plus 8-16 bytes a
//     row for the inverse map).
// Out-of-range indices fail the kernels' device-side checks (BERTKERN_DEVICE_CHECK).
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/padding.cuh"

namespace bertkern {
namespace cuda {

// ---- Launch shapes ---------------------------------------------------------------------------

// Threads for one sequence of the mask scans: whole warps, at most 512.
inline int mask_scan_threads(int64_t S) {
  int64_t t = ((S + kWarpSize - 1) / kWarpSize) * kWarpSize;
  if (t < kWarpSize) t = kWarpSize;
  if (t > 512) t = 512;
  return static_cast<int>(t);
}

constexpr int kCuSeqlensThreads = 1024;  // one block scans all B lengths

// Bytes per access of a row copy: the widest of 16 (a 4 x uint32 pack), 4, 2, 1 that divides
// both base addresses and the row size, so every row of both tensors stays aligned to it
// (a half tensor at an odd element offset is only 2-byte aligned).
inline int row_copy_unit(uintptr_t src, uintptr_t dst, int64_t row_bytes) {
  const uint64_t bits = static_cast<uint64_t>(src) | static_cast<uint64_t>(dst) | static_cast<uint64_t>(row_bytes);
  if (bits % 16 == 0) return 16;
  if (bits % 4 == 0) return 4;
  if (bits % 2 == 0) return 2;
  return 1;
}

// Row copies: block (threads_x over packs of one row, rows_y rows), 256 threads in all.
struct RowCopyPlan {
  int threads_x;
  int rows_y;
  int64_t blocks;
};
inline RowCopyPlan row_copy_plan(int64_t n_rows, int64_t n_packs) {
  RowCopyPlan plan;
  int64_t tx = ((n_packs + kWarpSize - 1) / kWarpSize) * kWarpSize;
  if (tx < kWarpSize) tx = kWarpSize;
  if (tx > 256) tx = 256;
  plan.threads_x = static_cast<int>(tx);
  plan.rows_y = static_cast<int>(256 / tx);
  int64_t blocks = (n_rows + plan.rows_y - 1) / plan.rows_y;
  if (blocks > 65536) blocks = 65536;  // grid-stride beyond
  plan.blocks = blocks > 0 ? blocks : 1;
  return plan;
}

constexpr int kIndexThreads = 256;  // 1-D index kernels of scatter_rows
constexpr int64_t kMaxPaddingBlocks = 65536;  // grid-stride beyond

namespace padding_detail {
inline unsigned grid_of(int64_t blocks, int64_t max_blocks) {
  if (max_blocks < 1) max_blocks = 1;
  if (blocks > max_blocks) blocks = max_blocks;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks);
}
}  // namespace padding_detail

// Launches 1 and 2 of mask_to_indices: seqlens (B int32 workspace), cu_seqlens (B + 1 int32),
// stats (2 int64: T, max seqlen). B > 0.
template <typename Launch>
void mask_lengths_launch(Launch&& launch, const bool* mask, int32_t* seqlens, int32_t* cu_seqlens,
                         int64_t* stats, int64_t B, int64_t S, int64_t max_blocks = kMaxPaddingBlocks) {
  const dim3 grid(padding_detail::grid_of(B, max_blocks));
  const dim3 block(static_cast<unsigned>(mask_scan_threads(S)));
  launch(grid, block, mask_seqlens_kernel<bool>, mask, seqlens, B, S);
  launch(dim3(1), dim3(kCuSeqlensThreads), cu_seqlens_kernel<int32_t>,
         static_cast<const int32_t*>(seqlens), cu_seqlens, stats, B);
}

// Launch 3 of mask_to_indices: indices (T int64). T > 0.
template <typename Launch>
void mask_indices_launch(Launch&& launch, const bool* mask, const int32_t* cu_seqlens, int64_t* indices,
                         int64_t B, int64_t S, int64_t max_blocks = kMaxPaddingBlocks) {
  const dim3 grid(padding_detail::grid_of(B, max_blocks));
  const dim3 block(static_cast<unsigned>(mask_scan_threads(S)));
  launch(grid, block, mask_indices_kernel<bool>, mask, cu_seqlens, indices, B, S);
}

// What a row copy ran with (unit_bytes 0: no launch).
struct RowCopyInfo {
  int unit_bytes = 0;
  int vec = 0;
  RowCopyPlan plan{0, 0, 0};
};

namespace padding_detail {
// Calls f(unit, vec_constant) for the copy unit of (src, dst, row_bytes).
template <typename F>
void with_copy_unit(const void* src, const void* dst, int64_t row_bytes, F&& f) {
  switch (row_copy_unit(reinterpret_cast<uintptr_t>(src), reinterpret_cast<uintptr_t>(dst), row_bytes)) {
    case 16: f(uint32_t{}, std::integral_constant<int, 4>{}); break;
    case 4: f(uint32_t{}, std::integral_constant<int, 1>{}); break;
    case 2: f(uint16_t{}, std::integral_constant<int, 1>{}); break;
    default: f(uint8_t{}, std::integral_constant<int, 1>{}); break;
  }
}
}  // namespace padding_detail

// dst[t] = src[indices[t]] for t < n; src has n_src rows of row_bytes bytes. An empty src with
// indices still launches, so the device-side check reports them.
template <typename Launch>
RowCopyInfo gather_rows_launch(Launch&& launch, const void* src, const int64_t* indices, void* dst,
                               int64_t n, int64_t n_src, int64_t row_bytes,
                               int64_t max_blocks = kMaxPaddingBlocks) {
  RowCopyInfo info;
  if (n == 0 || row_bytes == 0) return info;
  padding_detail::with_copy_unit(src, dst, row_bytes, [&](auto unit, auto vec_constant) {
    using T = decltype(unit);
    constexpr int VEC = decltype(vec_constant)::value;
    const int64_t n_packs = row_bytes / static_cast<int64_t>(sizeof(T) * VEC);
    const RowCopyPlan plan = row_copy_plan(n, n_packs);
    launch.check_aligned(src, sizeof(Pack<T, VEC>), "x");
    launch.check_aligned(dst, sizeof(Pack<T, VEC>), "out");
    launch(dim3(padding_detail::grid_of(plan.blocks, max_blocks)), dim3(plan.threads_x, plan.rows_y),
           gather_rows_kernel<T, VEC>, static_cast<const T*>(src), indices, static_cast<T*>(dst), n,
           n_src, n_packs);
    info.unit_bytes = static_cast<int>(sizeof(T));
    info.vec = VEC;
    info.plan = plan;
  });
  return info;
}

// dst (n_dst rows) = src's n rows at rows indices[t], zeros elsewhere. inverse: n_dst int64
// (uninitialized). Returns the pad_rows_kernel launch (unit_bytes 0: no launch).
template <typename Launch>
RowCopyInfo scatter_rows_launch(Launch&& launch, const void* src, const int64_t* indices, void* dst,
                                int64_t* inverse, int64_t n, int64_t n_dst, int64_t row_bytes,
                                int64_t max_blocks = kMaxPaddingBlocks) {
  RowCopyInfo info;
  if (row_bytes == 0) return info;
  const dim3 index_block(kIndexThreads);
  if (n_dst > 0) {
    launch(dim3(padding_detail::grid_of((n_dst + kIndexThreads - 1) / kIndexThreads, max_blocks)),
           index_block, fill_inverse_kernel<int64_t>, inverse, n_dst);
  }
  if (n > 0) {
    launch(dim3(padding_detail::grid_of((n + kIndexThreads - 1) / kIndexThreads, max_blocks)),
           index_block, invert_indices_kernel<int64_t>, indices, inverse, n, n_dst);
  }
  if (n_dst == 0) return info;
  padding_detail::with_copy_unit(src, dst, row_bytes, [&](auto unit, auto vec_constant) {
    using T = decltype(unit);
    constexpr int VEC = decltype(vec_constant)::value;
    const int64_t n_packs = row_bytes / static_cast<int64_t>(sizeof(T) * VEC);
    const RowCopyPlan plan = row_copy_plan(n_dst, n_packs);
    launch.check_aligned(src, sizeof(Pack<T, VEC>), "x_packed");
    launch.check_aligned(dst, sizeof(Pack<T, VEC>), "out");
    launch(dim3(padding_detail::grid_of(plan.blocks, max_blocks)), dim3(plan.threads_x, plan.rows_y),
           pad_rows_kernel<T, VEC>, static_cast<const T*>(src), static_cast<const int64_t*>(inverse),
           static_cast<T*>(dst), n_dst, n_packs);
    info.unit_bytes = static_cast<int>(sizeof(T));
    info.vec = VEC;
    info.plan = plan;
  });
  return info;
}

}  // namespace cuda
}  // namespace bertkern
