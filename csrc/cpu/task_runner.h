// Task runner for CPU kernels made of uneven, independent tasks (the attention kernels' (sequence,
// head, query block) tasks): run_tasks hands the tasks out largest first from a shared counter
// to the threads of libtorch's intra-op pool (bertkern::parallel_for), each with a per-thread
// scratch workspace, and keeps each task's GEMMs (blas.h) on its own thread. Balanced over
// sequences of very different lengths, and deterministic when every task writes only its own
// outputs.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <numeric>
#include <vector>

#include "cpu/blas.h"
#include "cpu/cpu_common.h"
#include "torch_api.h"

namespace bertkern {

// Per-thread scratch, kept between calls (the threads of libtorch's pool persist): a fresh
// allocation per call costs page faults comparable to a small call's compute. Only blocks up to
// kCachedWorkspaceBytes are kept; larger ones (very long sequences) are allocated per call.
constexpr int64_t kCachedWorkspaceBytes = int64_t{16} << 20;

template <typename T>
T* thread_workspace(int64_t elements) {
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < elements) {
    buffer = std::vector<T>();  // release first: never hold old and new at once
    buffer.resize(static_cast<size_t>(elements));
  }
  return buffer.data();
}

// Multiply-adds a worker thread should get at least (~15 us); waking a thread costs ~10 us.
constexpr int64_t kMinWorkPerThread = int64_t{1} << 19;

// Runs fn(task, workspace) for every task in the order of `cost` (multiply-adds per task), the
// largest first, taken from a shared counter by the worker threads, one workspace of
// `workspace_elements` T per worker. Each task writes only its own outputs, so results do not
// depend on which thread ran it.
template <typename T, typename Fn>
void run_tasks(const std::vector<int64_t>& cost, int64_t workspace_elements, const Fn& fn) {
  const int64_t n = static_cast<int64_t>(cost.size());
  if (n == 0) return;
  std::vector<int64_t> order(cost.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  const int64_t total = std::accumulate(cost.begin(), cost.end(), int64_t{0});
  const int64_t workers = std::clamp<int64_t>(total / kMinWorkPerThread, 1,
                                              std::min<int64_t>(n, get_num_threads()));
  // Sequential BLAS when tasks run on several threads (nested threading would oversubscribe) or
  // when the call is too small to split; a large call with a single worker (one task, or one
  // intra-op thread) leaves its GEMMs to the BLAS's own threads.
  const bool sequential_blas = workers > 1 || total < 2 * kMinWorkPerThread;
  std::atomic<int64_t> next{0};
  parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    SequentialBlas blas_guard(sequential_blas);
    std::vector<T> uncached;
    T* workspace = nullptr;
    if (workspace_elements * static_cast<int64_t>(sizeof(T)) <= kCachedWorkspaceBytes) {
      workspace = thread_workspace<T>(workspace_elements);
    } else {
      uncached.resize(static_cast<size_t>(workspace_elements));
      workspace = uncached.data();
    }
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      fn(order[i], workspace);
    }
  });
}

}  // namespace bertkern
