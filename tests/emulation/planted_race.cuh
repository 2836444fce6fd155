// A row-centering kernel in the style of csrc/cuda/layer_norm.cuh (grid-stride over rows, warp
// shuffles, then a block reduction through a __shared__ scratch array), with a switch to leave
// out either of its two __syncthreads. Test-only: proves that the host emulation run under
// ThreadSanitizer reports the shared-memory race a missing barrier causes, and nothing when the
// barriers are all there (tests/emulation/tsan_planted_race.cpp).
#pragma once

#include <cstdint>

namespace planted {

constexpr int kWarpSize = 32;
constexpr int kMaxWarps = 32;
constexpr unsigned kFullMask = 0xffffffffu;

enum class Barriers {
  kAll,                 // correct
  kMissingAfterWrite,   // warp 0 reads the other warps' partial sums before they are written
  kMissingBeforeReuse,  // the next row overwrites the scratch array while it is still being read
};

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// The block total is broadcast through warp_sums[0], so warp_sums must not be rewritten by the
// next call before every thread has read it: that takes the trailing barrier.
template <Barriers kBarriers>
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[kMaxWarps];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int n_warps = blockDim.x / kWarpSize;
  v = warp_sum(v);
  if (lane == 0) warp_sums[warp] = v;
  if (kBarriers != Barriers::kMissingAfterWrite) __syncthreads();
  if (warp == 0) {
    float s = lane < n_warps ? warp_sums[lane] : 0.f;
    s = warp_sum(s);
    if (lane == 0) warp_sums[0] = s;
  }
  __syncthreads();
  const float total = warp_sums[0];
  if (kBarriers != Barriers::kMissingBeforeReuse) __syncthreads();
  return total;
}

// Centers each row: y[row, :] = x[row, :] - mean_out[row], mean_out[row] = mean of x[row, :].
// Every thread uses the block total (so no thread's read of it can be optimized away).
// blockDim.x a multiple of 32.
template <Barriers kBarriers>
__global__ void row_center_kernel(const float* __restrict__ x, float* __restrict__ y,
                                  float* __restrict__ mean_out, int64_t M, int64_t N) {
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    float v = 0.f;
    for (int64_t col = threadIdx.x; col < N; col += blockDim.x) v += x[row * N + col];
    const float mean = block_sum<kBarriers>(v) / static_cast<float>(N);
    if (threadIdx.x == 0) mean_out[row] = mean;
    for (int64_t col = threadIdx.x; col < N; col += blockDim.x) y[row * N + col] = x[row * N + col] - mean;
  }
}

}  // namespace planted
