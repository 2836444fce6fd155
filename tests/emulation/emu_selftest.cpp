// Self-test of the CUDA host emulation (cuda_host_emu.h): index mapping, shuffle semantics
// (incl. width), barriers with exited threads, device-side checks (a failure aborts the grid
// and makes emu::launch throw emu::DeviceCheckError), and the misuses it must refuse. No torch.
// tests/test_emulated_layer_norm.py builds it with -fsanitize=thread and runs:
//   emu_selftest                 semantics checks; prints "PASSED" and exits 0
//   emu_selftest <misuse>        must abort with "cuda_host_emu: fatal: ..." (or, for
//                                bad_config, exit 0 after catching std::invalid_argument)
// misuses: divergent_syncthreads, shuffle_exited_lane, shuffle_with_exited_lanes,
//          partial_warp_shuffle, partial_mask,
//          hang (CUDA_HOST_EMU_TIMEOUT_S=1 expected), bad_config
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "cuda_host_emu.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    ++failures;
    std::printf("FAIL %s\n", what);
  }
}

struct F2 {
  float a, b;
};

// out[8 * tid + k]: k-th shuffle result of linear thread tid (one block).
__global__ void shuffle_kernel(int* out, double* out_d, F2* out_s) {
  const int lane = threadIdx.x % 32;
  int* o = out + 8 * threadIdx.x;
  o[0] = __shfl_xor_sync(0xffffffffu, lane, 5);
  o[1] = __shfl_xor_sync(0xffffffffu, lane, 8, 8);   // later group: own value
  o[2] = __shfl_xor_sync(0xffffffffu, lane, 8, 16);  // within the group of 16
  o[3] = __shfl_down_sync(0xffffffffu, lane, 3);
  o[4] = __shfl_down_sync(0xffffffffu, lane, 2, 8);
  o[5] = __shfl_up_sync(0xffffffffu, lane, 2, 16);
  o[6] = __shfl_sync(0xffffffffu, lane, 5, 8);
  o[7] = __shfl_sync(0xffffffffu, lane + 100 * static_cast<int>(threadIdx.x / 32), 31);
  out_d[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 0.5 + lane, 1);
  out_s[threadIdx.x] = __shfl_down_sync(0xffffffffu, F2{float(lane), -float(lane)}, 1);
  __syncwarp();
}

void check_shuffles() {
  const int threads = 64;
  std::vector<int> out(8 * threads, -1);
  std::vector<double> out_d(threads);
  std::vector<F2> out_s(threads);
  emu::launch(dim3(1), dim3(threads), shuffle_kernel, out.data(), out_d.data(), out_s.data());
  bool ok = true;
  for (int t = 0; t < threads; ++t) {
    const int l = t % 32;
    const int* o = &out[8 * t];
    ok = ok && o[0] == (l ^ 5);
    ok = ok && o[1] == ((l & 8) ? (l ^ 8) : l);
    ok = ok && o[2] == (l ^ 8);
    ok = ok && o[3] == (l + 3 < 32 ? l + 3 : l);
    ok = ok && o[4] == ((l % 8) + 2 < 8 ? l + 2 : l);
    ok = ok && o[5] == ((l % 16) >= 2 ? l - 2 : l);
    ok = ok && o[6] == ((l & ~7) + 5);
    ok = ok && o[7] == 31 + 100 * (t / 32);
    ok = ok && out_d[t] == 0.5 + (l ^ 1);
    ok = ok && out_s[t].a == float(l < 31 ? l + 1 : l) && out_s[t].b == -out_s[t].a;
  }
  expect(ok, "shuffle semantics");
}

// Index mapping of a 2-D block in a 3-D grid, and __syncthreads over it.
__global__ void index_kernel(unsigned* out, unsigned* sums) {
  __shared__ unsigned tile[4][32];
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned tid = threadIdx.x + blockDim.x * threadIdx.y;
  tile[threadIdx.y][threadIdx.x] = block * 1000 + tid;
  __syncthreads();
  if (tid == 0) {
    unsigned s = 0;
    for (int y = 0; y < 4; ++y)
      for (int x = 0; x < 32; ++x) s += tile[y][x];
    sums[block] = s;
    out[4 * block + 0] = blockDim.x * blockDim.y * blockDim.z;
    out[4 * block + 1] = gridDim.x * gridDim.y * gridDim.z;
    out[4 * block + 2] = blockIdx.x + 10 * blockIdx.y + 100 * blockIdx.z;
  }
  __syncthreads();  // tile is rewritten by no one, but keep a second phase per block
}

void check_indices() {
  const dim3 grid(3, 2, 2), block(32, 4);
  const unsigned n_blocks = 12;
  std::vector<unsigned> out(4 * n_blocks), sums(n_blocks);
  emu::launch(grid, block, index_kernel, out.data(), sums.data());
  bool ok = true;
  for (unsigned b = 0; b < n_blocks; ++b) {
    const unsigned x = b % 3, y = (b / 3) % 2, z = b / 6;
    ok = ok && out[4 * b] == 128 && out[4 * b + 1] == 12 && out[4 * b + 2] == x + 10 * y + 100 * z;
    ok = ok && sums[b] == 128 * b * 1000 + 127 * 128 / 2;
  }
  expect(ok, "thread / block indices and __syncthreads");
}

// Threads that return early count as arrived at later barriers (as on the GPU).
__global__ void early_exit_kernel(int* out) {
  __shared__ int vals[64];
  if (threadIdx.x >= 40) return;
  vals[threadIdx.x] = static_cast<int>(threadIdx.x);
  __syncthreads();
  int s = 0;
  for (int i = 0; i < 40; ++i) s += vals[i];
  __syncthreads();
  out[threadIdx.x] = s;
}

void check_early_exit() {
  std::vector<int> out(64, -1);
  emu::launch(dim3(3), dim3(64), early_exit_kernel, out.data());
  bool ok = true;
  for (int t = 0; t < 64; ++t) ok = ok && out[t] == (t < 40 ? 40 * 39 / 2 : -1);
  expect(ok, "early exit");
}

// ---- device-side checks
// Thread `bad_thread` of block `bad_block` fails its check after writing its shared slot and
// before the barrier; the rest of that block leaves at the barrier, no later block runs.
__global__ void trap_kernel(int* out, unsigned bad_block, unsigned bad_thread) {
  __shared__ int vals[64];
  vals[threadIdx.x] = static_cast<int>(threadIdx.x);
  BERTKERN_DEVICE_CHECK(!(blockIdx.x == bad_block && threadIdx.x == bad_thread), "planted failure");
  __syncthreads();
  const int v = __shfl_xor_sync(0xffffffffu, vals[(threadIdx.x + 1) % 64], 1);
  __syncthreads();
  out[blockIdx.x * 64 + threadIdx.x] = v;
}

// Lane 5 of warp 0 fails before a full-mask shuffle: its warp leaves at the shuffle (an aborted
// grid, not a shuffle with an exited lane).
__global__ void trap_before_shuffle_kernel(int* out) {
  EMU_DEVICE_CHECK(threadIdx.x != 5, "lane 5");
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 5);
  __syncwarp();
}

// Every thread fails: one message, from one of them.
__global__ void trap_everywhere_kernel(int* out) {
  EMU_DEVICE_CHECK(out == nullptr, "every thread");
  out[threadIdx.x] = 1;
}

template <typename F>
bool throws_device_check(F&& f, const char* expect_in_message) {
  try {
    f();
  } catch (const emu::DeviceCheckError& e) {
    const bool ok = std::strstr(e.what(), expect_in_message) != nullptr;
    if (!ok) std::printf("unexpected message: %s\n", e.what());
    return ok;
  }
  return false;
}

void check_device_checks() {
  std::vector<int> out(4 * 64, -1);
  // No failure: an ordinary launch.
  emu::launch(dim3(4), dim3(64), trap_kernel, out.data(), 99u, 99u);
  bool ok = true;
  for (int i = 0; i < 4 * 64; ++i) ok = ok && out[i] == (((i % 64) ^ 1) + 1) % 64;
  expect(ok, "device check: passing checks change nothing");

  std::fill(out.begin(), out.end(), -1);
  ok = throws_device_check([&] { emu::launch(dim3(4), dim3(64), trap_kernel, out.data(), 1u, 37u); },
                           "device-side check failed: planted failure (!(blockIdx.x == bad_block && "
                           "threadIdx.x == bad_thread)) at ");
  expect(ok, "device check: failure reported with its message");
  ok = throws_device_check([&] { emu::launch(dim3(4), dim3(64), trap_kernel, out.data(), 1u, 37u); },
                           "in block (1,0,0) thread (37,0,0)");
  expect(ok, "device check: failure names its block and thread");
  bool rest = true;
  for (int i = 0; i < 64; ++i) rest = rest && out[i] == ((i ^ 1) + 1) % 64;  // block 0 ran
  for (int i = 64; i < 4 * 64; ++i) rest = rest && out[i] == -1;  // aborted from block 1 on
  expect(rest, "device check: the failing block stops at its barrier, no later block runs");

  std::fill(out.begin(), out.end(), -1);
  ok = throws_device_check([&] { emu::launch(dim3(2), dim3(64), trap_before_shuffle_kernel, out.data()); },
                           "lane 5");
  bool warp0 = true;
  for (int i = 0; i < 32; ++i) warp0 = warp0 && out[i] == -1;
  expect(ok && warp0, "device check: a failed lane aborts its warp's shuffle");

  ok = throws_device_check([&] { emu::launch(dim3(3), dim3(32, 4), trap_everywhere_kernel, out.data()); },
                           "every thread (out == nullptr)");
  expect(ok, "device check: many failures, one error");

  // The next launch starts clean.
  std::fill(out.begin(), out.end(), -1);
  emu::launch(dim3(4), dim3(64), trap_kernel, out.data(), 99u, 99u);
  ok = true;
  for (int i = 0; i < 4 * 64; ++i) ok = ok && out[i] == (((i % 64) ^ 1) + 1) % 64;
  expect(ok, "device check: a launch after a failed one runs normally");
}

// ---- misuses
__global__ void divergent_kernel() {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void shuffle_exited_kernel(int* out) {
  if (threadIdx.x % 32 == 7) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 7);  // lane 0 reads lane 7
}

__global__ void partial_warp_kernel(int* out) { out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1); }

__global__ void partial_mask_kernel(int* out) { out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1, 1); }

__global__ void exited_lane_kernel(int* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);  // partners alive, lanes 16-31 gone
}

__global__ void hang_kernel(int* out) {
  if (threadIdx.x < 16) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
  } else {
    __syncthreads();  // half the warp shuffles, half waits at the block barrier: deadlock
  }
}

__global__ void noop_kernel() {}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> scratch(1024);
  const char* misuse = argc > 1 ? argv[1] : nullptr;
  if (misuse == nullptr) {
    check_shuffles();
    check_indices();
    check_early_exit();
    check_device_checks();
    std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "PASSED", failures);
    return failures ? 1 : 0;
  }
  if (!std::strcmp(misuse, "divergent_syncthreads")) emu::launch(dim3(1), dim3(64), divergent_kernel);
  else if (!std::strcmp(misuse, "shuffle_exited_lane")) emu::launch(dim3(1), dim3(32), shuffle_exited_kernel, scratch.data());
  else if (!std::strcmp(misuse, "shuffle_with_exited_lanes")) emu::launch(dim3(1), dim3(32), exited_lane_kernel, scratch.data());
  else if (!std::strcmp(misuse, "partial_warp_shuffle")) emu::launch(dim3(1), dim3(48), partial_warp_kernel, scratch.data());
  else if (!std::strcmp(misuse, "partial_mask")) emu::launch(dim3(1), dim3(32), partial_mask_kernel, scratch.data());
  else if (!std::strcmp(misuse, "hang")) emu::launch(dim3(1), dim3(32), hang_kernel, scratch.data());
  else if (!std::strcmp(misuse, "bad_config")) {
    for (dim3 block : {dim3(0), dim3(2048), dim3(32, 32, 2)}) {
      try {
        emu::launch(dim3(1), block, noop_kernel);
        std::printf("FAIL: launch accepted block (%u,%u,%u)\n", block.x, block.y, block.z);
        return 1;
      } catch (const std::invalid_argument&) {
      }
    }
    try {
      emu::launch(dim3(1, 70000), dim3(32), noop_kernel);
      std::printf("FAIL: launch accepted grid.y 70000\n");
      return 1;
    } catch (const std::invalid_argument&) {
    }
    std::printf("PASSED bad_config\n");
    return 0;
  } else {
    std::fprintf(stderr, "unknown misuse %s\n", misuse);
    return 2;
  }
  std::printf("misuse %s was not caught\n", misuse);
  return 1;
}
