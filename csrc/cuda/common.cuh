// Device-code basics shared by the csrc/cuda/*.cuh kernels (no ATen, no launches). Like the
// kernels, this compiles under nvcc and under the host emulation (tests/emulation/).
#pragma once

#include <cstdint>

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

}  // namespace cuda
}  // namespace bertkern
