// Cache hints for CPU row kernels that stream through tensors larger than the caches: software
// prefetch of the rows ahead, and when to write outputs with non-temporal (streaming) stores,
// with the fence that must follow them. The streaming writers themselves are intrinsics in the
// kernels that use them (layer_norm.cpp), chosen with cpu_features.h.
#pragma once

#include <cstdint>

#include "cpu/cpu_common.h"
#include "cpu/cpu_features.h"

namespace bertkern {

// Software prefetch of the rows a little ahead of the one being computed: a row is read from
// memory in its first pass only, and the later passes run from L1, during which the hardware
// prefetcher alone leaves the memory idle. Prefetching ~4 KiB ahead keeps it busy. Rows longer
// than kPrefetchMaxRowBytes are long streams in themselves, left to the hardware prefetcher.
constexpr int64_t kPrefetchBytes = 4096;
constexpr int64_t kPrefetchMaxRowBytes = 16384;

// How many rows ahead to prefetch; 0: none.
inline int64_t prefetch_rows_ahead(int64_t row_bytes) {
  if (row_bytes <= 0 || row_bytes > kPrefetchMaxRowBytes) return 0;
  return (kPrefetchBytes + row_bytes - 1) / row_bytes;
}

BERTKERN_ALWAYS_INLINE void prefetch_row(const void* row, int64_t bytes) {
#if defined(__GNUC__)
  const char* p = static_cast<const char*>(row);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 3);
#endif
}

// Non-temporal stores. An ordinary store first reads the destination line into the cache (read
// for ownership), so a row pass that reads x and writes y moves three lines per line of y. When
// the op's data is far larger than the last-level cache, keeping y in cache is of no use anyway,
// and non-temporal stores write it straight to memory: a third less traffic for a row pass
// y = f(x). GCC does not emit them from plain loops, hence intrinsics.
//
// Worth it when everything an op reads and writes is beyond what a last-level cache holds
// (32 MiB: one die's L3 on current server CPUs; sysconf reports the whole socket's, which no
// single core sees): the outputs would not stay cached for the next op anyway.
constexpr int64_t kStreamingBytes = int64_t(32) << 20;

inline bool exceeds_cache(int64_t bytes_moved) { return bytes_moved >= kStreamingBytes; }

// Orders the non-temporal stores of this thread before the op returns.
inline void store_fence() {
#if BERTKERN_X86_DISPATCH
  _mm_sfence();
#endif
}

}  // namespace bertkern
