// Device-code basics shared by the csrc/cuda/*.cuh kernels (no ATen, no launches). Like the
// kernels, this compiles under nvcc and under the host emulation (tests/emulation/).
#pragma once

#include <cstdint>

// A kernel's register cap: __maxnreg__(n) (nvcc 12.4+); older nvcc falls back to
// __launch_bounds__(512, 1) (<= 128 registers); the host emulation ignores both.
#if defined(__CUDACC__) && \
    (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 4))
#define BERTKERN_MAXNREG(n) __maxnreg__(n)
#else
#define BERTKERN_MAXNREG(n) __launch_bounds__(512, 1)
#endif

namespace bertkern {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;
constexpr int kMaxWarps = kMaxThreads / kWarpSize;
constexpr unsigned kFullMask = 0xffffffffu;

// VEC elements of T loaded or stored as one instruction (16 bytes when VEC * sizeof(T) == 16).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// p + 0, with the 0 hidden from the optimizer: loads through the result are not hoisted out of
// a loop as loop-invariant (which would keep a row's worth of weight / bias live in registers
// across the row loop), while the pointer still derives from the kernel argument (so nvcc
// keeps global loads, LDG, rather than generic ones). The host emulation has nothing to hide.
template <typename T>
__device__ __forceinline__ const T* opaque(const T* p) {
#if defined(__CUDA_ARCH__)
  int zero = 0;
  asm volatile("mov.b32 %0, %0;" : "+r"(zero));
  return p + zero;
#else
  return p;
#endif
}

}  // namespace cuda
}  // namespace bertkern
