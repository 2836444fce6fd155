// The GPU launcher of the launch plans (layer_norm_launch.cuh, padding_launch.cuh): a launch is
// `kernel<<<grid, block, 0, stream>>>(args...)` on the stream, checked at once. The host
// emulation (tests/emulation/emu_launcher.h) runs the same plans through emu::launch instead.
#pragma once

#if !defined(__CUDACC__)
#error "stream_launch.cuh is for nvcc; the emulation uses tests/emulation/emu_launcher.h"
#endif

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

namespace bertkern {
namespace cuda {

struct StreamLauncher {
  cudaStream_t stream;

  template <typename... Params, typename... Args>
  void operator()(dim3 grid, dim3 block, void (*kernel)(Params...), Args... args) const {
    kernel<<<grid, block, 0, stream>>>(static_cast<Params>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // A pack access needs an address aligned to the pack: the plans pick packs that are, so this
  // only documents the requirement on the GPU (the emulation's launcher checks it).
  void check_aligned(const void*, unsigned long, const char*) const {}
};

}  // namespace cuda
}  // namespace bertkern
