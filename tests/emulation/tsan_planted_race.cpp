// Runs planted_race.cuh through the host emulation; built with -fsanitize=thread by
// tests/test_emulated_layer_norm.py.
//   tsan_planted_race all                  barriers complete: no TSan report, results exact
//   tsan_planted_race missing_after_write  TSan must report a data race
//   tsan_planted_race missing_before_reuse TSan must report a data race
// Exit status: 0; 1 on bad usage or (for `all`) a wrong result; TSan's exitcode (66 by
// default) when it reported something.
#include <cstdio>
#include <cstring>
#include <vector>

#include "cuda_host_emu.h"
#include "planted_race.cuh"

template <planted::Barriers kBarriers>
static int run(bool check) {
  // 4 warps per block, 2 blocks striding over 5 rows: every block reuses its scratch array.
  const int64_t M = 5, N = 256;
  std::vector<float> x(M * N), y(M * N, -1.f), mean(M, -1.f);
  for (int64_t i = 0; i < M * N; ++i) x[i] = static_cast<float>((i * 7) % 11);  // exact sums
  emu::launch(dim3(2), dim3(128), planted::row_center_kernel<kBarriers>, x.data(), y.data(),
              mean.data(), M, N);
  int bad = 0;
  for (int64_t r = 0; r < M; ++r) {
    double sum = 0;
    for (int64_t c = 0; c < N; ++c) sum += x[r * N + c];
    const float ref_mean = static_cast<float>(sum) / static_cast<float>(N);
    bool ok = mean[r] == ref_mean;
    for (int64_t c = 0; c < N; ++c) ok = ok && y[r * N + c] == x[r * N + c] - ref_mean;
    if (!ok) {
      ++bad;
      std::printf("row %lld: mean %g, expected %g\n", static_cast<long long>(r), mean[r], ref_mean);
    }
  }
  std::printf("%s: %d wrong rows of %lld\n", check ? "checked" : "unchecked", bad,
              static_cast<long long>(M));
  return check && bad ? 1 : 0;
}

int main(int argc, char** argv) {
  const char* which = argc > 1 ? argv[1] : "";
  if (!std::strcmp(which, "all")) return run<planted::Barriers::kAll>(true);
  if (!std::strcmp(which, "missing_after_write"))
    return run<planted::Barriers::kMissingAfterWrite>(false);
  if (!std::strcmp(which, "missing_before_reuse"))
    return run<planted::Barriers::kMissingBeforeReuse>(false);
  std::fprintf(stderr, "usage: %s all|missing_after_write|missing_before_reuse\n", argv[0]);
  return 1;
}
