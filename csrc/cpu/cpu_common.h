// Build macros shared by the CPU kernels (csrc/cpu/*.cpp), and the grain of their
// bertkern::parallel_for loops (torch_api.h: libtorch's intra-op pool). The other shared
// pieces, one header each:
//   blas.h          row-major GEMM through the BLAS libtorch exports (attention)
//   task_runner.h   uneven independent tasks over the threads, largest first (attention)
//   philox.h        Philox4x32-10 as Triton computes it: dropout masks (attention, dropout)
//   convert.h       float16 / bfloat16 <-> float32 runs (layer_norm, dropout)
//   cpu_features.h  run-time x86 feature checks for per-ISA intrinsics (layer_norm, convert)
//   cache_hints.h   software prefetch, streaming-store policy and fence (layer_norm)
#pragma once

#include <algorithm>
#include <cstdint>

// One binary for every x86-64 CPU: hot float loops are cloned for AVX-512 and AVX2 (both with
// FMA) and the clone is picked at load time (GCC target_clones + ifunc, ELF only). Elsewhere,
// or when the whole file is already built for AVX-512, a single version.
#if (defined(__GNUC__) && !defined(__clang__)) && defined(__x86_64__) && defined(__linux__) && \
    !defined(__AVX512F__)
#define BERTKERN_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BERTKERN_MULTIVERSION
#endif

#if defined(__GNUC__)
#define BERTKERN_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define BERTKERN_ALWAYS_INLINE inline
#endif

namespace bertkern {

// Grain (items per task) of a parallel_for over items of item_size units each (elements,
// bytes): about task_size units per task, at least one item.
inline int64_t parallel_grain(int64_t task_size, int64_t item_size) {
  return std::max<int64_t>(1, task_size / std::max<int64_t>(item_size, 1));
}

}  // namespace bertkern
