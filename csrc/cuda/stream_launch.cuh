// The GPU launcher of the launch plans (layer_norm_launch.cuh, padding_launch.cuh): a launch is
// `kernel<<<grid, block, 0, stream>>>(args...)` on the stream, checked at once. The host
// emulation (tests/emulation/emu_launcher.h) runs the same plans through emu::launch instead.
// Also current_stream(t): torch's current CUDA stream on t's device, through the stable C shim.
#pragma once

#if !defined(__CUDACC__)
#error "stream_launch.cuh is for nvcc; the emulation uses tests/emulation/emu_launcher.h"
#endif

#if !defined(USE_CUDA)
#error "define USE_CUDA (setup.py does): the stable C shim declares its CUDA entry points under it"
#endif

#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>  // aoti_torch_get_current_cuda_stream (USE_CUDA)
#include <torch/csrc/stable/macros.h>                // STD_CUDA_KERNEL_LAUNCH_CHECK

#include "torch_api.h"

namespace bertkern {
namespace cuda {

// torch's current CUDA stream on t's device (what c10::cuda::getCurrentCUDAStream() returns
// under a guard set to that device).
inline cudaStream_t current_stream(const Tensor& t) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream));
  return static_cast<cudaStream_t>(stream);
}

struct StreamLauncher {
  cudaStream_t stream;

  template <typename... Params, typename... Args>
  void operator()(dim3 grid, dim3 block, void (*kernel)(Params...), Args... args) const {
    kernel<<<grid, block, 0, stream>>>(static_cast<Params>(args)...);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // A pack access needs an address aligned to the pack: the plans pick packs that are, so this
  // only documents the requirement on the GPU (the emulation's launcher checks it).
  void check_aligned(const void*, unsigned long, const char*) const {}
};

}  // namespace cuda
}  // namespace bertkern
