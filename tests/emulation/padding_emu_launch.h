// Host launcher for the key-padding kernels of csrc/cuda/padding.cuh through the CUDA host
// emulation: what the real CUDA launcher (csrc/cuda/padding.cu) does, on raw host pointers.
// Shared by the torch test extension (emulated_padding.cpp) and the standalone ThreadSanitizer
// driver (tsan_padding.cpp); no torch dependency.
//
// Launch plan (what padding.cu does on the GPU):
//   mask_to_indices: B == 0: cu_seqlens = {0}, no launch. Else mask_seqlens_kernel on grid
//     min(B, 65536), block mask_scan_threads(S); cu_seqlens_kernel on 1 block of
//     kCuSeqlensThreads; the host reads stats (T, max_seqlen); T > 0: mask_indices_kernel on the
//     grid and block of the first kernel.
//   gather_rows / scatter_rows: no launch when T == 0 or the source has no elements (scatter's
//     output is zero-filled by the caller before). Unit and VEC from the row's byte count and
//     the 16-byte alignment of both data pointers: (uint32, 4) if aligned and row_bytes % 16 == 0,
//     else (uint32, 1) if row_bytes % 4 == 0, else (uint16, 1) if % 2 == 0, else (uint8, 1);
//     plan = row_copy_plan(T, row_bytes / (unit * VEC)), grid plan.blocks, block
//     (plan.threads_x, plan.rows_y).
// Out-of-range indices are caught by the kernels' BERTKERN_DEVICE_CHECK (the emulation's
// device-side check, cuda_host_emu.h): emu::launch throws emu::DeviceCheckError.
//
// One thing the GPU does that the host does not: a load or store of a Pack<T, VEC> needs an
// address aligned to its size (else the launch fails with "misaligned address"). x86 reads
// misaligned words without complaint, so copy_rows checks both base pointers (every row starts
// at a multiple of the pack size from them) and throws MisalignedAddress like the GPU would.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda_host_emu.h"  // first: it defines BERTKERN_DEVICE_CHECK for padding.cuh
#include "cuda/padding.cuh"

namespace emu_padding {

using bertkern::cuda::RowCopyPlan;

// The GPU's "misaligned address" launch failure.
class MisalignedAddress : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Test hook: when > 0, every padding kernel's grid has at most this many blocks (instead of
// the 65536 of the real plan), so a small B or T runs the grid-stride loops over sequences and
// rows that only B > 65536 (or T > 65536 * rows per block) reaches on the GPU. 0: the real plan.
inline int64_t& block_cap() {
  static int64_t cap = 0;
  return cap;
}

inline unsigned capped_grid(int64_t blocks) {
  if (block_cap() > 0 && blocks > block_cap()) blocks = block_cap();
  return static_cast<unsigned>(blocks);
}

struct MaskStats {
  int64_t total;       // T = cu_seqlens[B]
  int64_t max_seqlen;  // 0 when B == 0 or every token is padding
};

// Launches 1 and 2 of mask_to_indices: cu_seqlens (B + 1 int32) and the stats the host reads
// back to size the indices. mask is (B, S) row-major.
inline MaskStats mask_lengths(const bool* mask, int32_t* cu_seqlens, int64_t B, int64_t S) {
  using namespace bertkern::cuda;
  if (B == 0) {  // padding.cu: cu_seqlens.zero_(), no launch
    cu_seqlens[0] = 0;
    return {0, 0};
  }
  std::unique_ptr<int32_t[]> seqlens(new int32_t[B]);
  int64_t stats[2] = {-1, -1};
  const dim3 grid(capped_grid(B < 65536 ? B : 65536));
  const dim3 block(static_cast<unsigned>(mask_scan_threads(S)));
  emu::launch(grid, block, mask_seqlens_kernel<bool>, mask, seqlens.get(), B, S);
  emu::launch(dim3(1), dim3(kCuSeqlensThreads), cu_seqlens_kernel<int32_t>,
              static_cast<const int32_t*>(seqlens.get()), cu_seqlens, static_cast<int64_t*>(stats), B);
  if (stats[0] > INT32_MAX) throw std::invalid_argument("key_padding_mask: more than 2^31 - 1 real tokens; cu_seqlens is int32");
  return {stats[0], stats[1]};
}

// Launch 3: indices (total int64). No launch when total == 0.
inline void mask_indices(const bool* mask, const int32_t* cu_seqlens, int64_t* indices, int64_t B,
                         int64_t S, int64_t total) {
  using namespace bertkern::cuda;
  if (total <= 0) return;
  const dim3 grid(capped_grid(B < 65536 ? B : 65536));
  const dim3 block(static_cast<unsigned>(mask_scan_threads(S)));
  emu::launch(grid, block, mask_indices_kernel<bool>, mask, cu_seqlens, indices, B, S);
}

// What a row copy ran with (unit_bytes 0: no launch).
struct RowCopyInfo {
  int unit_bytes = 0;
  int vec = 0;
  RowCopyPlan plan{0, 0, 0};
};

inline void check_pack_alignment(const void* p, std::size_t pack_bytes, const char* what) {
  if (p != nullptr && reinterpret_cast<std::uintptr_t>(p) % pack_bytes != 0) {
    throw MisalignedAddress(std::string("misaligned address: ") + what + " " +
                            std::to_string(reinterpret_cast<std::uintptr_t>(p)) + " is accessed in " +
                            std::to_string(pack_bytes) +
                            "-byte packs but is not aligned to them (the GPU faults)");
  }
}

// gather (kScatter false): dst[t] = src[indices[t]] for t < n, src has n_src rows;
// scatter (kScatter true): dst[indices[t]] = src[t] for t < n, dst has n_dst rows (zero-filled
// by the caller). Rows are row_bytes bytes. src_rows is the source's row count (n_src for a
// gather, n for a scatter): as padding.cu, no launch when n == 0 or the source is empty.
template <bool kScatter>
RowCopyInfo copy_rows(const void* src, const int64_t* indices, void* dst, int64_t n, int64_t n_src,
                      int64_t n_dst, int64_t row_bytes) {
  using namespace bertkern::cuda;
  RowCopyInfo info;
  if (n == 0 || row_bytes == 0) return info;  // as padding.cu: empty src still launches (index check)
  auto launch = [&](auto unit, auto vec_constant) {
    using T = decltype(unit);
    constexpr int VEC = decltype(vec_constant)::value;
    using P = Pack<T, VEC>;
    const int64_t n_packs = row_bytes / static_cast<int64_t>(sizeof(T) * VEC);
    const RowCopyPlan plan = row_copy_plan(n, n_packs);
    const dim3 grid(capped_grid(plan.blocks)), block(plan.threads_x, plan.rows_y);
    check_pack_alignment(src, sizeof(P), kScatter ? "x_packed" : "x");
    check_pack_alignment(dst, sizeof(P), "out");
    const T* s = static_cast<const T*>(src);
    T* d = static_cast<T*>(dst);
    if constexpr (kScatter) {
      emu::launch(grid, block, scatter_rows_kernel<T, VEC>, s, indices, d, n, n_dst, n_packs);
    } else {
      emu::launch(grid, block, gather_rows_kernel<T, VEC>, s, indices, d, n, n_src, n_packs);
    }
    info.unit_bytes = static_cast<int>(sizeof(T));
    info.vec = VEC;
    info.plan = plan;
  };
  switch (row_copy_unit(reinterpret_cast<std::uintptr_t>(src), reinterpret_cast<std::uintptr_t>(dst), row_bytes)) {
    case 16: launch(uint32_t{}, std::integral_constant<int, 4>{}); break;
    case 4: launch(uint32_t{}, std::integral_constant<int, 1>{}); break;
    case 2: launch(uint16_t{}, std::integral_constant<int, 1>{}); break;
    default: launch(uint8_t{}, std::integral_constant<int, 1>{}); break;
  }
  return info;
}

}  // namespace emu_padding
