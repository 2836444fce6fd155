// Host emulation of the CUDA execution model: compiles CUDA kernel source (csrc/cuda/*.cuh)
// with g++ and runs it on the CPU, one std::thread per CUDA thread. Test-only; no torch.
//
// How it runs a launch (emu::launch(grid, block, kernel, args...)):
//   * blockDim.x * .y * .z std::threads are started for the launch and reused for every block;
//     blocks run one after another (linear block index, x fastest), so `__shared__` is simply
//     `static`: function-static storage is the block's shared memory. An end-of-block barrier
//     separates blocks, so block b + 1 never touches shared memory block b still uses.
//   * threadIdx / blockIdx (uint3) and blockDim / gridDim (dim3) are thread_local.
//   * __syncthreads() is a barrier over the block's threads. A thread that returns from the
//     kernel counts as arrived at every later barrier of its block (as exited threads do on the
//     GPU). Each __syncthreads records its call site, and a barrier at which two threads stand
//     at different __syncthreads calls (divergent barrier: undefined behaviour on the GPU) is a
//     fatal error.
//   * Warp w is threads [32w, 32w + 32) of the linearized thread index; a warp shuffle writes the
//     value to a per-warp slot array, waits at a per-warp barrier, reads the source lane's slot
//     and waits at the per-warp barrier again (so the slots can be reused). A full-mask shuffle
//     in a warp with fewer than 32 threads, or with a lane that has returned, is a fatal error.
//   * Device-side checks: EMU_DEVICE_CHECK(cond, what) (and BERTKERN_DEVICE_CHECK, which this
//     header defines as EMU_DEVICE_CHECK, so include it before any csrc/cuda header) is the
//     emulation's `if (!cond) { printf(...); __trap(); }`. A failing thread records the failure
//     (the first one of the launch wins, with `what`, the condition, its file:line and the
//     block / thread) and leaves the kernel at once, so it never runs the code the check guards.
//     As __trap() ends the whole grid, the other threads then leave the kernel at their next
//     __syncthreads / __syncwarp / shuffle, and no further block starts. Exited threads count as
//     arrived at every barrier (as above), so nothing hangs. When the launch is over,
//     emu::launch throws emu::DeviceCheckError (a std::runtime_error) with the recorded message;
//     on the GPU the launch fails and the next CUDA call reports the error.
//   * A launch that does not finish within CUDA_HOST_EMU_TIMEOUT_S seconds (default 600; a
//     hang is how a shuffle or barrier reached by only part of its threads shows up) aborts
//     the process with a message.
//
// ThreadSanitizer: the barriers are built on std::atomic plus a raw futex wait (Linux), so the
// only happens-before edges TSan sees are the ones a barrier really makes (all arrivals of a
// phase before all departures of it). std::barrier is deliberately NOT used: libstdc++'s
// std::barrier waits through the process-wide atomic-wait pool, whose seq_cst read-modify-writes
// TSan takes as synchronization between unrelated threads, which hides real races depending on
// timing (measured with the planted race of tests/emulation/planted_race.cuh: a missing barrier
// before a scratch array's reuse was reported in 4 of 10 runs with std::barrier, 10 of 10 with
// this barrier). Correct kernels give no TSan report; a shared-memory write read by another
// thread with no __syncthreads between them (or a missing barrier before the next reuse of a
// scratch array) is reported as a data race. Note that the compiler may drop a shared-memory
// read whose value only some threads use, and TSan only sees the reads that remain.
//
// Supported subset of CUDA (anything else does not compile or is a fatal error):
//   __global__, __device__, __host__, __forceinline__, __launch_bounds__ (ignored), __restrict__
//   (g++ knows it),
//   static-size __shared__ variables declared inside device functions (no `extern __shared__`,
//   no namespace-scope __shared__ / __device__ / __constant__ variables), #pragma unroll
//   (ignored), threadIdx, blockIdx, blockDim, gridDim, warpSize, dim3, uint3, float2,
//   make_float2, rsqrtf, __ldg, __syncthreads(), __syncwarp(mask = full),
//   __shfl_sync / __shfl_xor_sync / __shfl_up_sync / __shfl_down_sync(mask, v, lane, width)
//   for trivially copyable v of at most 8 bytes, with the full mask 0xffffffff, all 32 lanes
//   of the warp present in the block and all of them executing the same shuffle.
//   EMU_DEVICE_CHECK / BERTKERN_DEVICE_CHECK(cond, what) (see above).
//   Kernels and device functions defined in headers must be templates or __forceinline__ (as
//   with nvcc; the keywords expand to nothing here). Not supported: atomics, dynamic shared
//   memory, cooperative groups, streams/events, launches from inside a kernel. Launches from
//   several host threads are serialized (shared memory is process-wide static storage).
// Device math is plain host float math (rsqrtf = 1 / sqrtf, IEEE division), not the GPU's
// approximations (--use_fast_math): compare with tolerances, not bits, across the two.
#pragma once

#if defined(__CUDACC__)
#error "cuda_host_emu.h is for host compilers (g++); nvcc compiles the kernels natively"
#endif

#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <condition_variable>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <source_location>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

// ---- CUDA keywords and builtin types --------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __shared__ static
#define __launch_bounds__(...)

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

struct alignas(8) float2 {
  float x, y;
};

inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

constexpr int warpSize = 32;

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};

namespace emu {

// Thrown by emu::launch after a launch in which a device-side check failed (the first failure's
// message: what, condition, file:line, block and thread).
class DeviceCheckError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Unwinds a thread out of its kernel after a failed device-side check (the emulation's __trap):
// thrown by device_check_failed and by the barriers / shuffles of the other threads, caught by
// emu::launch around each kernel call.
struct Trap {};

// Prints the first fatal error of the process and aborts; a second thread failing at the same
// time blocks here until the abort.
[[noreturn]] inline void fatal(const char* fmt, ...) {
  static std::mutex once;
  once.lock();
  std::va_list ap;
  va_start(ap, fmt);
  std::fprintf(stderr, "cuda_host_emu: fatal: ");
  std::vfprintf(stderr, fmt, ap);
  std::fprintf(stderr, "\n");
  va_end(ap);
  std::fflush(stderr);
  std::abort();
}

// A reusable barrier for a fixed set of threads, with arrive_and_drop (a thread leaving for
// good counts as arrived now and is not waited for in later phases). Arrivals are an acq_rel
// fetch_add on one counter; the last arrival publishes the next generation with a release
// store; waiters acquire-load the generation. Sleeping is a raw futex, which TSan does not treat
// as synchronization, so TSan sees exactly the barrier's own happens-before edges.
class Barrier {
 public:
  explicit Barrier(int expected) : expected_(expected) {}
  Barrier(const Barrier&) = delete;
  Barrier& operator=(const Barrier&) = delete;

  void arrive_and_wait() { arrive(false, [] {}); }
  void arrive_and_drop() { arrive(true, [] {}); }
  // The last arrival runs on_complete() before anyone is released.
  template <typename F>
  void arrive_and_wait(F&& on_complete) {
    arrive(false, on_complete);
  }

 private:
  template <typename F>
  void arrive(bool drop, F&& on_complete) {
    // The phase cannot advance without this thread's arrival, so this is the current phase.
    // expected_ is read before arriving: the last arrival rewrites it after every arrival.
    const std::uint32_t gen = gen_.load(std::memory_order_relaxed);
    const int expected = expected_;
    if (drop) drops_.fetch_add(1, std::memory_order_relaxed);
    const int arrived = arrived_.fetch_add(1, std::memory_order_acq_rel) + 1;
    if (arrived == expected) {  // last arrival: complete the phase
      on_complete();
      expected_ -= drops_.exchange(0, std::memory_order_relaxed);
      arrived_.store(0, std::memory_order_relaxed);
      gen_.store(gen + 1, std::memory_order_release);
      wake_all();
      return;
    }
    if (drop) return;
    for (int spin = 0; spin < 64; ++spin) {
      if (gen_.load(std::memory_order_acquire) != gen) return;
    }
    while (gen_.load(std::memory_order_acquire) == gen) sleep_while(gen);
  }

  void sleep_while(std::uint32_t gen) {
#if defined(__linux__)
    syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&gen_), FUTEX_WAIT_PRIVATE, gen, nullptr,
            nullptr, 0);
#else
    (void)gen;
    std::this_thread::yield();
#endif
  }

  void wake_all() {
#if defined(__linux__)
    syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&gen_), FUTEX_WAKE_PRIVATE, INT_MAX,
            nullptr, nullptr, 0);
#endif
  }

  static_assert(sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t));
  alignas(64) std::atomic<std::uint32_t> gen_{0};
  alignas(64) std::atomic<int> arrived_{0};
  std::atomic<int> drops_{0};
  int expected_;  // written only by the last arrival, before it publishes the generation
};

// Where a thread stands at its n-th __syncthreads of the current block.
struct SyncRecord {
  std::uint64_t phase;
  const char* file;
  std::uint32_t line;
  std::uint32_t column;
};

struct WarpState {
  unsigned size = 0;  // threads of the block in this warp (the last warp may be partial)
  std::optional<Barrier> barrier;
  std::uint64_t slot[kWarpSize];
  bool exited[kWarpSize];
};

struct LaunchState {
  LaunchState(dim3 grid_, dim3 block_)
      : grid(grid_),
        block(block_),
        n_threads(block_.x * block_.y * block_.z),
        n_warps((n_threads + kWarpSize - 1) / kWarpSize),
        warps(new WarpState[n_warps]) {
    for (int parity = 0; parity < 2; ++parity) records[parity].reset(new SyncRecord[n_threads]);
    for (unsigned w = 0; w < n_warps; ++w) {
      const unsigned rest = n_threads - w * kWarpSize;
      warps[w].size = rest < kWarpSize ? rest : kWarpSize;
    }
    begin_block();
  }

  // Fresh barriers and bookkeeping for the next block. Runs while no thread of the launch is
  // inside a block (before the first block, and as the end-of-block barrier's completion).
  void begin_block() noexcept {
    block_barrier.emplace(static_cast<int>(n_threads));
    for (unsigned w = 0; w < n_warps; ++w) {
      warps[w].barrier.emplace(static_cast<int>(warps[w].size));
      for (int lane = 0; lane < kWarpSize; ++lane) warps[w].exited[lane] = false;
    }
    for (int parity = 0; parity < 2; ++parity)
      for (unsigned t = 0; t < n_threads; ++t) records[parity][t] = SyncRecord{UINT64_MAX, "", 0, 0};
  }

  // Set by the first failed device-side check (the grid is aborted); failure says why. The
  // failing thread stores `trapped` (release) before it leaves the barriers, so a thread that
  // meets an exited lane or thread at a barrier of the same launch sees it (acquire).
  bool is_trapped() const noexcept { return trapped.load(std::memory_order_acquire); }
  std::atomic<bool> trapped{false};
  std::mutex failure_mutex;
  std::string failure;

  const dim3 grid, block;
  const unsigned n_threads, n_warps;
  std::optional<Barrier> block_barrier;
  std::unique_ptr<WarpState[]> warps;
  std::unique_ptr<SyncRecord[]> records[2];  // by __syncthreads phase parity
};

struct ThreadState {
  LaunchState* launch;
  unsigned tid, warp, lane;
  std::uint64_t sync_phase;  // __syncthreads calls so far in this block
};

inline thread_local ThreadState* current = nullptr;

inline ThreadState& this_thread(const char* what) {
  if (current == nullptr) fatal("%s called outside a kernel run by emu::launch", what);
  return *current;
}

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

inline void sync_block(const std::source_location& loc) {
  ThreadState& t = this_thread("__syncthreads");
  LaunchState& L = *t.launch;
  const std::uint64_t phase = t.sync_phase++;
  SyncRecord* recs = L.records[phase & 1].get();
  recs[t.tid] = SyncRecord{phase, loc.file_name(), loc.line(), loc.column()};
  L.block_barrier->arrive_and_wait();
  if (L.is_trapped()) throw Trap{};  // the grid was aborted by a failed device-side check
  // Every thread checks its neighbour: if the threads at this barrier are not all at the same
  // __syncthreads, some pair of neighbours differs. A neighbour that has exited has an older
  // phase in its record and is skipped. Its record for this parity is rewritten only two
  // barriers later, after this thread has arrived at the next one.
  const unsigned next = (t.tid + 1) % L.n_threads;
  const SyncRecord& mine = recs[t.tid];
  const SyncRecord& other = recs[next];
  if (next != t.tid && other.phase == phase &&
      (other.line != mine.line || other.column != mine.column ||
       (other.file != mine.file && std::strcmp(other.file, mine.file) != 0))) {
    fatal(
        "divergent __syncthreads in block (%u,%u,%u): thread %u is at %s:%u:%u, thread %u at "
        "%s:%u:%u",
        blockIdx.x, blockIdx.y, blockIdx.z, t.tid, mine.file, mine.line, mine.column, next,
        other.file, other.line, other.column);
  }
}

inline WarpState& full_warp(ThreadState& t, unsigned mask, const char* what) {
  if (mask != kFullMask) fatal("%s: only the full mask 0xffffffff is supported (got %#x)", what, mask);
  WarpState& w = t.launch->warps[t.warp];
  if (w.size != kWarpSize)
    fatal("%s with the full mask in warp %u, which has only %u threads (blockDim %u,%u,%u)", what,
          t.warp, w.size, blockDim.x, blockDim.y, blockDim.z);
  return w;
}

inline void check_width(int width, const char* what) {
  if (width <= 0 || width > kWarpSize || (width & (width - 1)) != 0)
    fatal("%s: width %d is not a power of two in [1, 32]", what, width);
}

// Every lane publishes `value`, then reads lane `src`'s.
template <typename T>
T exchange(ThreadState& t, WarpState& w, T value, unsigned src, const char* what) {
  static_assert(std::is_trivially_copyable_v<T>, "shuffled type must be trivially copyable");
  static_assert(sizeof(T) <= sizeof(std::uint64_t), "shuffled type must be at most 8 bytes");
  std::uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  w.slot[t.lane] = bits;
  w.barrier->arrive_and_wait();
  // A lane that left after a failed device-side check is no misuse: the grid is aborted.
  if (t.launch->is_trapped()) throw Trap{};
  // The full mask names every lane: all must be here (none may have returned).
  for (unsigned lane = 0; lane < kWarpSize; ++lane) {
    if (w.exited[lane])
      fatal("%s with the full mask in warp %u, whose lane %u has exited (lane %u reads lane %u)",
            what, t.warp, lane, t.lane, src);
  }
  bits = w.slot[src];
  w.barrier->arrive_and_wait();
  T out = value;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

inline void validate_launch(dim3 grid, dim3 block) {
  const unsigned long long threads =
      static_cast<unsigned long long>(block.x) * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 ||
      block.z > 64 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    throw std::invalid_argument(
        "emu::launch: invalid configuration argument: grid (" + std::to_string(grid.x) + ", " +
        std::to_string(grid.y) + ", " + std::to_string(grid.z) + "), block (" +
        std::to_string(block.x) + ", " + std::to_string(block.y) + ", " +
        std::to_string(block.z) + ")");
  }
}

inline double launch_timeout_s() {
  const char* env = std::getenv("CUDA_HOST_EMU_TIMEOUT_S");
  if (env != nullptr) {
    const double v = std::atof(env);
    if (v > 0) return v;
  }
  return 600.0;
}

// Runs once per block boundary, while every thread waits at the end-of-block barrier.
struct EndOfBlock {
  LaunchState* launch;
  void operator()() noexcept { launch->begin_block(); }
};

// A device-side check failed in the calling kernel thread: record it (the first failure of the
// launch wins) and leave the kernel.
[[noreturn]] inline void device_check_failed(const char* what, const char* cond, const char* file,
                                             unsigned line) {
  ThreadState& t = this_thread("a device-side check");
  LaunchState& L = *t.launch;
  {
    std::lock_guard<std::mutex> lock(L.failure_mutex);
    if (L.failure.empty()) {
      char where[160];
      std::snprintf(where, sizeof where, " in block (%u,%u,%u) thread (%u,%u,%u)", blockIdx.x,
                    blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
      L.failure = std::string("device-side check failed: ") + what + " (" + cond + ") at " +
                  file + ":" + std::to_string(line) + where;
    }
  }
  L.trapped.store(true, std::memory_order_release);
  throw Trap{};
}

}  // namespace detail

// Runs kernel(args...) in every thread of every block of a (grid, block) launch and returns
// when all are done (a synchronous launch). Throws std::invalid_argument for a configuration
// CUDA would reject, and emu::DeviceCheckError (after every thread has stopped) when a
// device-side check failed in the launch.
template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block, Kernel kernel, Args... args) {
  detail::validate_launch(grid, block);
  std::lock_guard<std::mutex> serialize(detail::launch_mutex());

  detail::LaunchState state(grid, block);
  const unsigned n_threads = state.n_threads;
  const std::uint64_t n_blocks = static_cast<std::uint64_t>(grid.x) * grid.y * grid.z;
  detail::Barrier end_of_block(static_cast<int>(n_threads));
  detail::EndOfBlock next_block{&state};
  const std::tuple<Args...> params(args...);

  std::mutex done_mutex;
  std::condition_variable done_cv;
  unsigned done = 0;

  auto body = [&](unsigned tid) {
    detail::ThreadState ts{&state, tid, tid / detail::kWarpSize, tid % detail::kWarpSize, 0};
    detail::current = &ts;
    threadIdx = uint3{tid % block.x, (tid / block.x) % block.y, tid / (block.x * block.y)};
    blockDim = block;
    gridDim = grid;
    for (std::uint64_t b = 0; b < n_blocks; ++b) {
      blockIdx = uint3{static_cast<unsigned>(b % grid.x),
                       static_cast<unsigned>((b / grid.x) % grid.y),
                       static_cast<unsigned>(b / (static_cast<std::uint64_t>(grid.x) * grid.y))};
      ts.sync_phase = 0;
      // After a failed device-side check no further block runs (a thread that reads the flag
      // late may still skip the block it is at: the same as an early return).
      if (!state.is_trapped()) {
        try {
          std::apply(kernel, params);
        } catch (const detail::Trap&) {
          // left the kernel after a failed device-side check: an exited thread from here on
        }
      }
      // This thread is done with the block: it no longer holds up the block's barriers.
      detail::WarpState& w = state.warps[ts.warp];
      w.exited[ts.lane] = true;
      w.barrier->arrive_and_drop();
      state.block_barrier->arrive_and_drop();
      // Then wait for the whole block, and let one thread reset the barriers for the next.
      end_of_block.arrive_and_wait(next_block);
    }
    detail::current = nullptr;
    {
      std::lock_guard<std::mutex> lock(done_mutex);
      ++done;
    }
    done_cv.notify_one();
  };

  std::vector<std::thread> threads;
  threads.reserve(n_threads);
  try {
    for (unsigned tid = 0; tid < n_threads; ++tid) threads.emplace_back(body, tid);
  } catch (const std::exception& e) {
    detail::fatal("emu::launch: could not start thread %zu of %u: %s", threads.size(), n_threads,
                  e.what());
  }
  {
    std::unique_lock<std::mutex> lock(done_mutex);
    const auto timeout = std::chrono::duration<double>(detail::launch_timeout_s());
    if (!done_cv.wait_for(lock, timeout, [&] { return done == n_threads; })) {
      detail::fatal(
          "launch grid (%u,%u,%u) block (%u,%u,%u) did not finish in %.0f s: a __syncthreads, "
          "__syncwarp or shuffle reached by only part of its threads? (CUDA_HOST_EMU_TIMEOUT_S)",
          grid.x, grid.y, grid.z, block.x, block.y, block.z, timeout.count());
    }
  }
  for (auto& th : threads) th.join();
  if (state.is_trapped()) throw DeviceCheckError("emu::launch: " + state.failure);
}

}  // namespace emu

// The emulation's device-side check (nvcc: `if (!(cond)) { printf(...); __trap(); }`).
#define EMU_DEVICE_CHECK(cond, what)                                              \
  do {                                                                            \
    if (!(cond)) ::emu::detail::device_check_failed((what), #cond, __FILE__, __LINE__); \
  } while (0)

// Kernel headers (csrc/cuda/*.cuh) define BERTKERN_DEVICE_CHECK only when it is not defined yet;
// their host-compiler fallback is a no-op, so this must come first.
#if defined(BERTKERN_DEVICE_CHECK)
#error "BERTKERN_DEVICE_CHECK is already defined: include cuda_host_emu.h before csrc/cuda headers"
#endif
#define BERTKERN_DEVICE_CHECK(cond, what) EMU_DEVICE_CHECK(cond, what)

// ---- Device builtins ------------------------------------------------------------------------

inline void __syncthreads(std::source_location loc = std::source_location::current()) {
  emu::detail::sync_block(loc);
}

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  emu::detail::ThreadState& t = emu::detail::this_thread("__syncwarp");
  if (mask != emu::detail::kFullMask) emu::detail::fatal("__syncwarp: only the full mask is supported");
  t.launch->warps[t.warp].barrier->arrive_and_wait();
  if (t.launch->is_trapped()) throw emu::detail::Trap{};
}

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  emu::detail::ThreadState& t = emu::detail::this_thread("__shfl_sync");
  emu::detail::WarpState& w = emu::detail::full_warp(t, mask, "__shfl_sync");
  emu::detail::check_width(width, "__shfl_sync");
  const unsigned seg = t.lane & ~static_cast<unsigned>(width - 1);
  const unsigned src = seg + (static_cast<unsigned>(src_lane) & static_cast<unsigned>(width - 1));
  return emu::detail::exchange(t, w, var, src, "__shfl_sync");
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  emu::detail::ThreadState& t = emu::detail::this_thread("__shfl_xor_sync");
  emu::detail::WarpState& w = emu::detail::full_warp(t, mask, "__shfl_xor_sync");
  emu::detail::check_width(width, "__shfl_xor_sync");
  const unsigned seg_end = (t.lane & ~static_cast<unsigned>(width - 1)) + width;
  unsigned src = t.lane ^ static_cast<unsigned>(lane_mask);
  if (src >= seg_end) src = t.lane;  // a lane of a later group: keep own value
  return emu::detail::exchange(t, w, var, src, "__shfl_xor_sync");
}

template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  emu::detail::ThreadState& t = emu::detail::this_thread("__shfl_down_sync");
  emu::detail::WarpState& w = emu::detail::full_warp(t, mask, "__shfl_down_sync");
  emu::detail::check_width(width, "__shfl_down_sync");
  const unsigned in_seg = t.lane & static_cast<unsigned>(width - 1);
  const unsigned src = in_seg + delta < static_cast<unsigned>(width) ? t.lane + delta : t.lane;
  return emu::detail::exchange(t, w, var, src, "__shfl_down_sync");
}

template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  emu::detail::ThreadState& t = emu::detail::this_thread("__shfl_up_sync");
  emu::detail::WarpState& w = emu::detail::full_warp(t, mask, "__shfl_up_sync");
  emu::detail::check_width(width, "__shfl_up_sync");
  const unsigned in_seg = t.lane & static_cast<unsigned>(width - 1);
  const unsigned src = in_seg >= delta ? t.lane - delta : t.lane;
  return emu::detail::exchange(t, w, var, src, "__shfl_up_sync");
}
