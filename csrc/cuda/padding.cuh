// Key-padding masking: CUDA device code only (no ATen, no launches).
//
//   mask (B, S) bool, True = padding  --seqlens-->  seqlens (B,) int32
//   seqlens --cu_seqlens--> cu_seqlens (B+1,) int32 (0, then running sums), max_seqlen
//   mask + cu_seqlens --indices--> indices (T,) int64: flat positions b*S+s of real tokens,
//                                  in row-major order
//   gather_rows:  dst[t, :] = src[indices[t], :]      (unpad; backward of pad)
//   scatter_rows: dst[indices[t], :] = src[t, :], zeros elsewhere (pad; backward of unpad)
//
// Launch plans (shared by padding.cu and the host emulation) are in padding_launch.cuh.
// Compiled by nvcc (padding.cu) and by g++ against the host emulation (tests/emulation/), so it
// keeps to that subset (see layer_norm.cuh). Row copies are dtype-agnostic: T is an unsigned
// integer of the element's size, moved VEC at a time (16 bytes when alignment allows).
#pragma once

#include <cstdint>

#include "cuda/common.cuh"

#ifndef BERTKERN_DEVICE_CHECK
#if defined(__CUDACC__)
#include <cstdio>
// A failed device-side check prints and traps: the launch fails with an error that the next
// CUDA call reports ("unspecified launch failure"), never a silent out-of-bounds write.
#define BERTKERN_DEVICE_CHECK(cond, what)                                        \
  do {                                                                           \
    if (!(cond)) {                                                               \
      printf("bertkern: device-side check failed: %s (%s)\n", what, #cond);      \
      __trap();                                                                  \
    }                                                                            \
  } while (0)
#else
#define BERTKERN_DEVICE_CHECK(cond, what) ((void)0)
#endif
#endif

namespace bertkern {
namespace cuda {

// ---- Block-wide integer reductions and scans ---------------------------------------------

__device__ __forceinline__ int warp_inclusive_scan(int v) {
  const int lane = threadIdx.x % kWarpSize;
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const int up = __shfl_up_sync(kFullMask, v, offset);
    if (lane >= offset) v += up;
  }
  return v;
}

// Inclusive scan of v over the block (blockDim.x a multiple of 32); *total gets the block sum.
// Ends with a barrier so the caller may call it again at once (the scratch is reused).
__device__ __forceinline__ int block_inclusive_scan(int v, int* total) {
  __shared__ int warp_totals[kMaxWarps];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int n_warps = blockDim.x / kWarpSize;
  v = warp_inclusive_scan(v);
  if (lane == kWarpSize - 1) warp_totals[warp] = v;
  __syncthreads();
  int before = 0, sum = 0;
  for (int w = 0; w < n_warps; ++w) {
    const int t = warp_totals[w];
    if (w < warp) before += t;
    sum += t;
  }
  __syncthreads();  // everyone has read warp_totals before the next call overwrites it
  *total = sum;
  return v + before;
}

// ---- Mask scans ---------------------------------------------------------------------------

// Kernels are templates (MaskT = bool) so the header can be included by several translation
// units, as device functions in headers must be under the host emulation too.

// One block per sequence: seqlens[b] = number of False (real) entries in mask[b, :].
template <typename MaskT>
__global__ void mask_seqlens_kernel(const MaskT* __restrict__ mask, int32_t* __restrict__ seqlens,
                                    int64_t B, int64_t S) {
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const MaskT* row = mask + b * S;
    int count = 0;
    for (int64_t s = threadIdx.x; s < S; s += blockDim.x) count += row[s] ? 0 : 1;
    int total = 0;
    block_inclusive_scan(count, &total);
    if (threadIdx.x == 0) seqlens[b] = total;
  }
}

// One block: cu_seqlens[0] = 0, cu_seqlens[b + 1] = seqlens[0] + ... + seqlens[b], and
// stats[0] = T (the total, in int64: the host refuses T > INT32_MAX, where the int32
// cu_seqlens would have wrapped), stats[1] = max seqlen; the host reads both in one copy.
template <typename LenT>
__global__ void cu_seqlens_kernel(const LenT* __restrict__ seqlens, int32_t* __restrict__ cu_seqlens,
                                  int64_t* __restrict__ stats, int64_t B) {
  __shared__ int warp_max[kMaxWarps];
  int64_t carry = 0;
  int running_max = 0;
  for (int64_t b0 = 0; b0 < B; b0 += blockDim.x) {
    const int64_t b = b0 + threadIdx.x;
    const int len = b < B ? seqlens[b] : 0;
    if (len > running_max) running_max = len;
    int total = 0;
    const int inclusive = block_inclusive_scan(len, &total);
    if (b < B) cu_seqlens[b + 1] = static_cast<int32_t>(carry + inclusive);
    carry += total;
  }
  // max over the block: warp shuffles, then warp 0 over the warp maxima
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const int other = __shfl_xor_sync(kFullMask, running_max, offset);
    if (other > running_max) running_max = other;
  }
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  if (lane == 0) warp_max[warp] = running_max;
  __syncthreads();
  if (threadIdx.x == 0) {
    int m = 0;
    for (int w = 0; w < static_cast<int>(blockDim.x / kWarpSize); ++w) m = warp_max[w] > m ? warp_max[w] : m;
    cu_seqlens[0] = 0;
    stats[0] = carry;
    stats[1] = m;
  }
}

// One block per sequence: indices[cu_seqlens[b] + k] = b * S + s for the k-th real s.
template <typename MaskT>
__global__ void mask_indices_kernel(const MaskT* __restrict__ mask, const int32_t* __restrict__ cu_seqlens,
                                    int64_t* __restrict__ indices, int64_t B, int64_t S) {
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const MaskT* row = mask + b * S;
    int64_t out = cu_seqlens[b];
    for (int64_t s0 = 0; s0 < S; s0 += blockDim.x) {
      const int64_t s = s0 + threadIdx.x;
      const int keep = (s < S && !row[s]) ? 1 : 0;
      int chunk_total = 0;
      const int rank = block_inclusive_scan(keep, &chunk_total);  // 1-based among kept
      if (keep) indices[out + rank - 1] = b * S + s;
      out += chunk_total;
    }
  }
}

// ---- Row gather / scatter -----------------------------------------------------------------

// dst[t, :] = src[indices[t], :] for t < n_out; src has n_src rows. Each row is n_packs packs.
template <typename T, int VEC>
__global__ void gather_rows_kernel(const T* __restrict__ src, const int64_t* __restrict__ indices,
                                   T* __restrict__ dst, int64_t n_out, int64_t n_src, int64_t n_packs) {
  using P = Pack<T, VEC>;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; t < n_out;
       t += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t i = indices[t];
    BERTKERN_DEVICE_CHECK(i >= 0 && i < n_src, "gather_rows: index out of range");
    const P* from = reinterpret_cast<const P*>(src) + i * n_packs;
    P* to = reinterpret_cast<P*>(dst) + t * n_packs;
    for (int64_t p = threadIdx.x; p < n_packs; p += blockDim.x) to[p] = from[p];
  }
}

// scatter_rows, without a zero-fill pass over the output: three launches,
//   inverse[r] = -1 for r < n_dst                     (fill_inverse_kernel, 8 bytes a row)
//   inverse[indices[t]] = t for t < n_in              (invert_indices_kernel, range-checked)
//   dst[r, :] = inverse[r] >= 0 ? src[inverse[r], :] : 0   (pad_rows_kernel)
// so every output byte is written once, with either its row or zeros. Indices are unique (as
// from mask_to_indices); with duplicates a row gets one of its sources, whole.
template <typename IndexT>
__global__ void fill_inverse_kernel(IndexT* __restrict__ inverse, int64_t n_dst) {
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < n_dst;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x)
    inverse[r] = -1;
}

template <typename IndexT>
__global__ void invert_indices_kernel(const IndexT* __restrict__ indices, IndexT* __restrict__ inverse,
                                      int64_t n_in, int64_t n_dst) {
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < n_in;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = indices[t];
    BERTKERN_DEVICE_CHECK(i >= 0 && i < n_dst, "scatter_rows: index out of range");
    inverse[i] = t;
  }
}

// dst[r, :] = src[inverse[r], :] where inverse[r] >= 0, else zeros; r < n_dst. Block as the
// row copies (threads_x over packs of one row, rows_y rows).
template <typename T, int VEC>
__global__ void pad_rows_kernel(const T* __restrict__ src, const int64_t* __restrict__ inverse,
                                T* __restrict__ dst, int64_t n_dst, int64_t n_packs) {
  using P = Pack<T, VEC>;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < n_dst;
       r += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t t = inverse[r];
    P* to = reinterpret_cast<P*>(dst) + r * n_packs;
    if (t >= 0) {
      const P* from = reinterpret_cast<const P*>(src) + t * n_packs;
      for (int64_t p = threadIdx.x; p < n_packs; p += blockDim.x) to[p] = from[p];
    } else {
      P zero;
      for (int j = 0; j < VEC; ++j) zero.v[j] = 0;
      for (int64_t p = threadIdx.x; p < n_packs; p += blockDim.x) to[p] = zero;
    }
  }
}

}  // namespace cuda
}  // namespace bertkern
