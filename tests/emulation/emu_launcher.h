// The host emulation's launcher for the shared launch plans of csrc/cuda/*_launch.cuh: a launch
// is emu::launch(grid, block, kernel, args...) (cuda_host_emu.h), so the emulation runs the
// very plans csrc/cuda/*.cu run on the GPU (there, through StreamLauncher of
// csrc/cuda/stream_launch.cuh). No torch dependency.
//
// Test hooks, no counterpart on the GPU:
//   * max_blocks: the plans' grid cap (0: the real cap). Lowering it makes a small input run
//     the grid-stride loops the GPU only takes for very large ones.
//   * every launch is recorded (grid, block) in `launches`, so tests can see the plan that ran.
//   * check_aligned throws MisalignedAddress where the GPU would fail the launch with
//     "misaligned address" (x86 reads misaligned words without complaint).
#pragma once

#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_host_emu.h"  // first: it defines BERTKERN_DEVICE_CHECK for the csrc/cuda headers

namespace emu_plans {

// The GPU's "misaligned address" launch failure.
class MisalignedAddress : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct LaunchRecord {
  dim3 grid, block;
};

struct EmuLauncher {
  std::vector<LaunchRecord>* launches = nullptr;  // optional log

  template <typename Kernel, typename... Args>
  void operator()(dim3 grid, dim3 block, Kernel kernel, Args... args) const {
    if (launches != nullptr) launches->push_back(LaunchRecord{grid, block});
    emu::launch(grid, block, kernel, args...);
  }

  void check_aligned(const void* p, unsigned long bytes, const char* what) const {
    if (p != nullptr && reinterpret_cast<std::uintptr_t>(p) % bytes != 0) {
      throw MisalignedAddress(std::string("misaligned address: ") + what + " " +
                              std::to_string(reinterpret_cast<std::uintptr_t>(p)) +
                              " is accessed in " + std::to_string(bytes) +
                              "-byte packs but is not aligned to them (the GPU faults)");
    }
  }
};

// The max_blocks hook's value: the grid cap a test sets through bertkern_emu::_set_*_block_cap
// (0: the real cap), read by every launching thread.
class GridCap {
 public:
  // The cap to give a plan whose real cap is `real`.
  int64_t or_real(int64_t real) const {
    std::lock_guard<std::mutex> lock(mutex_);
    return cap_ > 0 ? cap_ : real;
  }
  // Sets the cap (0: the real one); returns the previous one.
  int64_t exchange(int64_t cap) {
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t previous = cap_;
    cap_ = cap;
    return previous;
  }

 private:
  mutable std::mutex mutex_;
  int64_t cap_ = 0;
};

}  // namespace emu_plans
